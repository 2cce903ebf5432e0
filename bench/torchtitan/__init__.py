"""torchtitan (PyPI) trained with the model shape and settings of one of our YAML configs, so
its tokens/s can be compared with ours in the same lease. See README.md beside this file."""
