"""sgdtheory: the theory of batch size and learning rate for SGD, checked by simulation.

Conventions (see README "Units and conventions"):

* the training loss L is the *mean* of per-example losses; G = grad L, H = hess L;
* Sigma is the covariance of per-example gradients (1/N normalisation on finite data);
* ``lr`` (eta) multiplies the *mean* minibatch gradient; the base rate is eta/B;
* heavy-ball momentum is ``v <- mu v + g; theta <- theta - lr v`` (torch.optim.SGD).
"""

__version__ = "0.1.0"
