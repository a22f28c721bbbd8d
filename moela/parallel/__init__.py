"""Parallelism: mesh axes and the logical-axis rules that map model names onto them."""
