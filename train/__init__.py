"""Training long-tailed classifiers with the acl_kernels losses: `python -m train --config <name>`."""
