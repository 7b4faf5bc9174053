# Sourced by the deploy scripts that install Debian packages
# (dev-services.sh, browser-deps.sh); they define say and die first.
#
#   as_root CMD...       CMD as root: directly, or through sudo
#   apt_install ARG...   apt-get install ARG..., after one apt-get update per run
#                        (a fresh machine or image may have no package lists)

if [ "$(id -u)" -eq 0 ]; then
    as_root() { "$@"; }
else
    as_root() {
        command -v sudo >/dev/null || die "need root or sudo for: $*"
        sudo "$@"
    }
fi

apt_updated=""
apt_install() {
    command -v apt-get >/dev/null || die "$* not installed and no apt-get to install it; install it by hand"
    say "installing $*"
    if [ -z "$apt_updated" ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
        || die "apt-get install $* failed"
}
