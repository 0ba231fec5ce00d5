"""Hook-based modules on TransformerLens hook points; depends on no other package of ours."""
