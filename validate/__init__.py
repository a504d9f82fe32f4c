"""validate: the theory of :mod:`sgdtheory` measured on real PyTorch networks.

Import the submodules you need (``validate.measure``, ``validate.digits_check``); importing
this package does not import torch.
"""
