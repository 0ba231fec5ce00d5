"""Hook-based modules on TransformerLens hook points; depends on no other package of ours."""

from hooks.allocator import use_huge_pages

# Before any module of ours imports torch: its allocator reads the setting once (see use_huge_pages).
use_huge_pages()
