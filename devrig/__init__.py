"""The development rig: private stock Postfix and Dovecot instances and the local demo stack.

Not part of the installed mailplugins (``pyproject.toml`` does not list it): the tests and
``scripts/run`` import it from the checkout. Nothing in the product may import it.
"""
