"""The policyd: config section: defaults, switches, contexts, and errors naming the key."""

from __future__ import annotations

from typing import Any

import pytest

from mailplugins.config import ConfigError
from mailplugins.config.fields import Fields
from mailplugins.config.policyd import CHECKS, PolicydConfig, parse_policyd


def parse(**section: Any) -> PolicydConfig:
    section.setdefault("listen", "unix:/tmp/mp-policy.sock:mode=660")
    return parse_policyd(Fields(section, "policyd"))


def error(**section: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse(**section)
    return str(info.value)


def test_defaults() -> None:
    config = parse()
    assert config.listen == ("unix:/tmp/mp-policy.sock:mode=660",)
    assert config.checks == CHECKS
    assert config.contexts == {}
    assert config.fallback_action == "DEFER_IF_PERMIT Service temporarily unavailable"
    assert config.budget == 2.0
    assert config.idle_timeout >= 1100
    assert config.reject_disabled_as_unknown is True
    assert config.checks_for("") == CHECKS
    assert config.checks_for("anything") == CHECKS


def test_switches_and_contexts() -> None:
    config = parse(
        spoof_protection=False,
        contexts={
            "submission": {"checks": ["sender_login_match", "relay_control"]},
            "none": {"checks": []},
        },
    )
    assert config.checks == ("recipient_validation", "relay_control", "sender_login_match")
    # Always the fixed order, whatever order the operator listed them in.
    assert config.checks_for("submission") == ("relay_control", "sender_login_match")
    assert config.checks_for("none") == ()
    assert config.checks_for("smtp") == config.checks


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"contexts": {"submission": {"checks": ["relay", "x"]}}},
         'policyd.contexts.submission.checks[0]: unknown check "relay"'),
        ({"contexts": {"submission": {}}}, "policyd.contexts.submission.checks: required key is missing"),
        ({"contexts": {"submission": {"checks": [], "mynetworks": []}}},
         "policyd.contexts.submission.mynetworks: unknown key"),
        ({"contexts": ["submission"]}, "policyd.contexts: expected a mapping"),
        ({"fallback_action": "BLAH x"}, 'policyd.fallback_action: unknown action "BLAH"'),
        ({"fallback_action": "DUNNO\nOK"}, "policyd.fallback_action: an action must be one line"),
        ({"fallback_action": ""}, "policyd.fallback_action: expected an access(5) action"),
        ({"spoof_protection": "no"}, "policyd.spoof_protection: expected true or false"),
        ({"reject_disabled_as_unknown": 1}, "policyd.reject_disabled_as_unknown: expected true or false"),
        ({"mynetworks": ["10.0.0.0/33"]}, "policyd.mynetworks[0]: not an IP network"),
        ({"budget": "0s"}, "policyd.budget: must be at least"),
        ({"max_line_length": 10}, "policyd.max_line_length: must be at least 256"),
        ({"relay": True}, "policyd.relay: unknown key"),
    ],
)
def test_errors_name_the_key(section: dict[str, Any], message: str) -> None:
    assert message in error(**section)


@pytest.mark.parametrize("action", ["DUNNO", "dunno", "450 4.7.1 try later", "DEFER_IF_PERMIT x", "OK"])
def test_fallback_actions_postfix_accepts(action: str) -> None:
    assert parse(fallback_action=action).fallback_action == action


def test_state_sections_check_actions_without_the_policyd_section() -> None:
    """config/policy_state.py imported check_action late from config/policyd.py (a cycle)."""
    import ast
    import inspect

    import mailplugins.config.policy_state as state
    from mailplugins.config.actions import check_action

    tree = ast.parse(inspect.getsource(state))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "mailplugins.config.policyd" not in imported
    assert vars(state)["check_action"] is check_action
