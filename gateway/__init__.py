"""bt-gateway: the one egress door for Braintrust SDK traffic."""

__version__ = "0.1.0"
