"""postfix-config wires milterd per direction; doctor checks the endpoint and default actions."""

from __future__ import annotations

from pathlib import Path

from mailplugins.wiring.doctor import check_postfix, milter_problem
from mailplugins.wiring.live import PostfixLive
from mailplugins.wiring.postfix import PostfixOptions, PostfixSnippet, postfix_config
from tests.unit.test_wiring_doctor import GOOD_M, GOOD_N, GOOD_P, POSTCONF_D
from tests.unit.test_wiring_postfix import make_config

MILTER = "unix:/var/spool/postfix/private/mailplugins-milter:mode=660"
OPTIONS = PostfixOptions(domain_names=("example.org", "example.net"))


def snippet() -> PostfixSnippet:
    return postfix_config(make_config(milterd={"listen": MILTER}), OPTIONS)


def test_three_lists_with_a_default_action_per_direction() -> None:
    main = snippet().main_dict()
    assert main["milter_protocol"] == "6"
    assert main["smtpd_milters"] == (
        "{ unix:private/mailplugins-milter, connect_timeout=10s, command_timeout=30s, "
        "content_timeout=60s, default_action=accept }")
    assert "default_action=tempfail" in main["non_smtpd_milters"]
    assert "default_action=tempfail" in main["mailplugins_submission_milters"]
    (submission,) = snippet().services
    assert ("smtpd_milters", "$mailplugins_submission_milters") in submission.overrides


def test_no_milterd_no_milters() -> None:
    assert "smtpd_milters" not in postfix_config(make_config(), OPTIONS).main_dict()


GOOD_MILTER_N = GOOD_N + """\
milter_protocol = 6
smtpd_milters = inet:127.0.0.1:11332, {unix:private/mailplugins-milter, default_action=accept}
non_smtpd_milters = { unix:private/mailplugins-milter, default_action = tempfail }
mailplugins_submission_milters = { unix:private/mailplugins-milter, default_action=tempfail }
"""
GOOD_MILTER_P = GOOD_P + "submission/inet/smtpd_milters = $mailplugins_submission_milters\n"


def live(n: str = GOOD_MILTER_N, p: str = GOOD_MILTER_P) -> PostfixLive:
    return PostfixLive.from_text(n=n, d=POSTCONF_D, m=GOOD_M, p=p)


def test_doctor_accepts_other_milters_spacing_and_timeouts() -> None:
    assert check_postfix(snippet(), live()) == []


def test_doctor_reports_a_missing_milter_and_a_wrong_default_action() -> None:
    n = GOOD_MILTER_N.replace("non_smtpd_milters = { unix:private/mailplugins-milter, "
                              "default_action = tempfail }\n", "")
    (finding,) = check_postfix(snippet(), live(n=n))
    assert finding.problem == "non_smtpd_milters is unset"
    assert finding.fix.startswith("postconf -e 'non_smtpd_milters = {")
    (finding,) = check_postfix(snippet(), live(n=n + "non_smtpd_milters = inet:127.0.0.1:8891\n"))
    assert finding.problem.startswith("non_smtpd_milters lacks unix:private/mailplugins-milter")
    # The submission service without its override inherits port 25's accept: unsigned mail.
    (finding,) = check_postfix(snippet(), live(p=GOOD_P))
    assert finding.problem == ("submission/inet: smtpd_milters has unix:private/mailplugins-milter "
                               "with default_action=accept (want tempfail)")


def test_milter_default_action_falls_back_to_the_global_one() -> None:
    main = {"milter_default_action": "accept"}
    assert milter_problem("{ a, default_action=accept }", "a", main) is None
    assert milter_problem("{ a, default_action=tempfail }", "a", {}) is None
    assert milter_problem("{ a, default_action=tempfail }", "a", main) == (
        "has a with default_action=accept (want tempfail)")


def test_doctor_probes_milterd_too(tmp_path: Path) -> None:
    from mailplugins.wiring.probe import probe_daemons

    config = make_config(policyd=None, authd=None, deliver=None,
                         milterd={"listen": f"unix:{tmp_path}/milter.sock"})
    (finding,) = probe_daemons(config, timeout=1)
    assert finding.problem.startswith(f"milterd.listen: nothing answers at {tmp_path}/milter.sock (")
    assert finding.fix == "systemctl start mailplugins-milterd (then: journalctl -u mailplugins-milterd)"
