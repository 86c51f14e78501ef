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
    $SUDO apt-get -o DPkg::Lock::Timeout=300 update -q
    $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}"
}

# ensure_venv EXTRAS: ./.venv with mailplugins[EXTRAS] installed editable; rebuilt when the
# packaging metadata (pyproject.toml: PEP 621 [project], dependencies and extras) changes.
ensure_venv() {
    local extras="$1" python="${PYTHON:-python3}" stamp=".venv/.mailplugins-deps" want have extra
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)-$extras"
    have="$(cat "$stamp" 2>/dev/null || true)"
    # A venv made for more extras serves fewer (scripts/run after scripts/test): rebuilding it
    # would pull it away from under a test run that is using it.
    if [ -x .venv/bin/python ] && [ "${have%%-*}" = "${want%%-*}" ]; then
        for extra in ${extras//,/ }; do
            [[ ",${have#*-}," == *",$extra,"* ]] || have=""
        done
        [ -z "$have" ] || return 0
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

# python3-venv: Debian 13 ships python3 without venv's ensurepip. swaks --tls (the line
# scripts/run prints) needs Net::SSLeay and IO::Socket::SSL.
MAIL_PACKAGES=(postfix postfix-pgsql postfix-mysql dovecot-core dovecot-imapd dovecot-pop3d dovecot-lmtpd dovecot-auth-lua swaks
               opendkim opendkim-tools
               systemd openssl python3-venv libnet-ssleay-perl libio-socket-ssl-perl)

# The e2e tests run the host's Postfix/Dovecot and the other Debian release's from a root built
# with mmdebstrap (see ensure_release_root).
RIG_TOOLS=(mmdebstrap)

# What the other release's root holds: the mail servers the e2e tests run, and OpenDKIM (the
# oracle milterd's tests compare with). Postfix goes in after its debconf question is answered.
ROOT_PACKAGES=(dovecot-core dovecot-imapd dovecot-pop3d dovecot-lmtpd dovecot-auth-lua ca-certificates
               opendkim opendkim-tools)
ROOT_POSTFIX_PACKAGES=(postfix postfix-pgsql postfix-mysql)
# Bump when the recipe below changes in a way the package lists do not show.
ROOT_RECIPE=1
RIG_CACHE="${MAILPLUGINS_RIG_CACHE:-/var/cache/mailplugins-test}"

# host_debian: the host's Debian major release (12 or 13), from /etc/os-release.
host_debian() {
    (. /etc/os-release && [ "${ID:-}" = debian ] && echo "${VERSION_ID:-}")
}

# debian_mirror: the Debian mirror the host's apt already uses for its own release.
debian_mirror() {
    local codename
    codename="$(. /etc/os-release && echo "$VERSION_CODENAME")"
    local mirror
    mirror="$(apt-get indextargets --format '$(REPO_URI) $(CODENAME)' 2>/dev/null \
        | awk -v c="$codename" '$2 == c { print $1; exit }')"
    # No package lists yet (apt-get indextargets knows only downloaded ones): read the sources.
    [ -n "$mirror" ] || mirror="$(python3 devrig/rootfs.py mirror "$codename" || true)"
    # One spelling (apt's, with the slash) so the root's recipe stamp does not change with it.
    [ -z "$mirror" ] || echo "${mirror%/}/"
}

# ensure_release_root: the root of the release the host is not (Debian 13 on a Debian 12 host,
# Debian 12 on a Debian 13 host) under $RIG_CACHE, built once with mmdebstrap and rebuilt when
# its recipe (suite, mirror, package lists, the host's mail users' ids) changes or a
# "stale" file beside it says so. Prints nothing when the root is current.
ensure_release_root() {
    local host name suite mirror root stamp want
    host="$(host_debian)"
    case "$host" in
        12) name=debian13 suite=trixie ;;
        13) name=debian12 suite=bookworm ;;
        *) echo "the e2e rig runs on Debian 12 or 13; this is $(. /etc/os-release && echo "$PRETTY_NAME")" >&2
           exit 2 ;;
    esac
    root="$RIG_CACHE/$name"
    stamp="$RIG_CACHE/$name.stamp"
    mirror="$(debian_mirror)"
    if [ -z "$mirror" ]; then
        echo "no Debian mirror found in this machine's apt sources (apt-get indextargets)" >&2
        exit 2
    fi
    want="$(printf '%s\n' "$ROOT_RECIPE" "$suite" "$mirror" "${ROOT_PACKAGES[*]}" \
        "${ROOT_POSTFIX_PACKAGES[*]}" "$(python3 devrig/rootfs.py ids)" | sha256sum | cut -d' ' -f1)"
    $SUDO mkdir -p "$RIG_CACHE"
    (
        # One builder at a time; the others wait and then find the root current.
        flock 9
        if [ -d "$root" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && [ ! -e "$root.stale" ]; then
            exit 0
        fi
        echo "== building the $name root ($suite from $mirror) in $root"
        $SUDO rm -rf "$root.new"
        local preseed="echo 'postfix postfix/main_mailer_type select No configuration'"
        $SUDO mmdebstrap --quiet --variant=apt --include="debconf,$(IFS=,; echo "${ROOT_PACKAGES[*]}")" \
            --customize-hook="$preseed | chroot \"\$1\" debconf-set-selections" \
            --customize-hook="chroot \"\$1\" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${ROOT_POSTFIX_PACKAGES[*]} >/dev/null" \
            --customize-hook='chroot "$1" apt-get clean' \
            "$suite" "$root.new" "deb $mirror $suite main"
        $SUDO python3 devrig/rootfs.py align "$root.new"
        $SUDO rm -rf "$root.old" "$root.stale"
        [ ! -d "$root" ] || $SUDO mv "$root" "$root.old"
        $SUDO mv "$root.new" "$root"
        $SUDO rm -rf "$root.old"
        echo "$want" | $SUDO tee "$stamp" >/dev/null
    ) 9>"$RIG_CACHE/.lock"
}

# ensure_exim: Exim 4 (exim4-daemon-heavy), the second LMTP client the differential suite runs,
# unpacked under $RIG_CACHE/exim and never installed: installing it with apt would remove
# Postfix. Its packages and the libraries it needs that the host lacks are fetched with
# apt-get download and unpacked with dpkg -x; rebuilt when the candidate version changes.
# (Exim's compiled-in user Debian-exim does not exist here: the tests run it in a private mount
# namespace with their own passwd and group files, see tests/support/exim.py.)
ensure_exim() {
    local dir="$RIG_CACHE/exim" want dep missing=()
    want="$(apt-cache policy exim4-daemon-heavy | awk '/Candidate:/ { print $2 }')"
    want="$want-1"  # the recipe's version: bump when the steps below change
    if [ -x "$dir/root/usr/sbin/exim4" ] && [ "$(cat "$dir/stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    echo "== unpacking exim4-daemon-heavy $want into $dir (not installed)"
    for dep in $(apt-cache depends exim4-daemon-heavy | awk '$1 == "Depends:" && $2 !~ /^</ { print $2 }'); do
        dpkg-query -W -f='${Status}' "$dep" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$dep")
    done
    $SUDO rm -rf "$dir.new"
    $SUDO mkdir -p "$dir.new/debs"
    (cd "$dir.new/debs" && $SUDO apt-get download -q exim4-daemon-heavy "${missing[@]}" >/dev/null 2>&1) || {
        echo "apt-get download exim4-daemon-heavy ${missing[*]} failed" >&2
        exit 2
    }
    for deb in "$dir.new"/debs/*.deb; do
        $SUDO dpkg -x "$deb" "$dir.new/root"
    done
    # Not set-uid: the tests run it as root, and a set-uid re-exec would ignore the
    # LD_LIBRARY_PATH that finds the unpacked libraries.
    $SUDO chmod u-s "$dir.new/root/usr/sbin/exim4"
    $SUDO rm -rf "$dir"
    $SUDO mv "$dir.new" "$dir"
    echo "$want" | $SUDO tee "$dir/stamp" >/dev/null
}
