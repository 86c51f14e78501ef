"""Wiring stock Postfix and Dovecot to the daemons: the settings to write, and ``doctor``'s checks.

``endpoints`` reads a listener's endpoint string as a client sees it, ``postfix`` and
``dovecot`` generate the settings for each server (one source for ``postfix-config``,
``dovecot-config``, the doctor and the end-to-end tests), ``live`` reads what ``postconf`` and
``doveconf`` say is configured, and ``doctor`` compares the two.
"""
