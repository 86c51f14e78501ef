"""mailplugins: policy, authentication and delivery daemons for stock Postfix and Dovecot."""

__version__ = "0.1.0"
