# Shared by scripts/run and scripts/test: system packages when missing, and ./.venv.
# shellcheck shell=bash

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# ensure_packages PACKAGE...: apt-get install only what is missing (update once, first).
ensure_packages() {
    local missing=() package
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$package")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    echo "== installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # No system mail service: mailplugins runs private instances on loopback ports.
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# ensure_venv EXTRAS: ./.venv with mailplugins[EXTRAS] installed editable; rebuilt when the
# packaging files change.
ensure_venv() {
    local extras="$1" python="${PYTHON:-python3}" stamp=".venv/.mailplugins-deps" want
    want="$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)-$extras"
    if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "mailplugins needs Python 3.11 or newer ($python is older)" >&2
        exit 2
    fi
    echo "== installing mailplugins[$extras] into .venv"
    rm -rf .venv
    "$python" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[$extras]"
    echo "$want" > "$stamp"
}

MAIL_PACKAGES=(postfix postfix-pgsql postfix-mysql dovecot-core dovecot-imapd dovecot-pop3d dovecot-lmtpd dovecot-auth-lua swaks
               opendkim opendkim-tools
               systemd openssl)
