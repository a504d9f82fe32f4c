"""validate: the theory of :mod:`sgdtheory` measured on real PyTorch networks.

Import the submodules you need (``validate.measure`` for noise and curvature estimates,
``validate.train``/``validate.data``/``validate.models`` to train, ``validate.experiments`` for
the seeds' experiments on a real network, ``validate.cifar`` and ``validate.digits_check`` for
their command lines); importing this package does not import torch.
"""
