"""What a researcher computes on top of the model: entropy, output shift, laws, sweeps, reports."""
