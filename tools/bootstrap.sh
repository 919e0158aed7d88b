#!/usr/bin/env bash
# One entry point for a fresh Debian/Ubuntu host, as root:
#   bash tools/bootstrap.sh run    install everything, then apply ./inventory.yaml
#   bash tools/bootstrap.sh test   install everything, then run every test
#   bash tools/bootstrap.sh setup  install only
# Installs apt packages (when any is missing: apt-get update first), a venv in
# .venv, and the project into it with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(qemu-system-x86 qemu-utils busybox-static cpio kmod iproute2 nftables e2fsprogs
              python3 python3-venv ca-certificates
              # real operating systems: UEFI firmware, libosinfo's OS database, DHCP/DNS
              ovmf osinfo-db dnsmasq-base
              # `consolidator image build debian`
              debootstrap fdisk dosfstools mtools)
# the test suite also opens the HTML report in headless Chromium, and boots Debian's
# installer from an ISO it makes with grub-mkrescue (BIOS and UEFI)
TEST_APT_PACKAGES=(chromium fonts-dejavu-core debian-installer-12-netboot-amd64
                   grub-common grub-pc-bin grub-efi-amd64-bin xorriso)
VENV=${CONSOLIDATOR_VENV:-.venv}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

setup_apt() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "apt packages present"
        return
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages ${missing[*]}: run as root" >&2
        exit 4
    fi
    say "apt-get update; installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
}

setup_python() {
    local py=${PYTHON:-python3}
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating venv $VENV with $($py --version)"
        "$py" -m venv "$VENV"
    fi
    local stamp="$VENV/.consolidator-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        # compat: a path entry instead of an import-hook finder (28 ms off every CLI start)
        local pip=("$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
                   --config-settings editable_mode=compat)
        local wheels
        wheels=$(wheelhouse)
        if [ -n "$wheels" ] && "${pip[@]}" --no-index --find-links "$wheels" 2>/dev/null; then
            say "pip install -e .[test] from the wheelhouse $wheels"
        else
            say "pip install -e .[test]"
            "${pip[@]}"
        fi
        touch "$stamp"
    fi
}

# Every dependency as a wheel, under /var/tmp by the hash of pyproject.toml and the
# interpreter: a fresh clone's install then resolves nothing and downloads nothing (25 s
# instead of 50). Prints the directory, or nothing when it cannot be made.
wheelhouse() {
    local base=/var/tmp/consolidator-wheels key tmp
    key=$( (cat pyproject.toml; "$VENV/bin/python" -VV) | sha256sum | cut -c1-16)
    if [ ! -d "$base/$key" ]; then
        mkdir -p "$base"
        tmp=$(mktemp -d "$base/.new.XXXXXX")
        say "building the wheelhouse $base/$key (once per pyproject.toml)"
        if "$VENV/bin/pip" wheel -q --disable-pip-version-check -w "$tmp" '.[test]' \
                'setuptools>=68' wheel >/dev/null 2>&1; then
            rm -f "$tmp"/consolidator-*.whl
            find "$base" -mindepth 1 -maxdepth 1 -not -name '.new.*' -exec rm -rf {} +
            mv -T "$tmp" "$base/$key" 2>/dev/null || rm -rf "$tmp"   # another run was first
        else
            rm -rf "$tmp"
        fi
    fi
    [ -d "$base/$key" ] && echo "$base/$key"
    return 0
}

cmd=${1:-run}
shift || true
if [ "$cmd" = test ]; then
    APT_PACKAGES+=("${TEST_APT_PACKAGES[@]}")
fi
setup_apt
setup_python
case "$cmd" in
    setup) ;;
    run)
        exec "$VENV/bin/consolidator" apply "$@"
        ;;
    test)
        # the real-OS tests boot Debian disks built from Debian's packages: built once
        # per machine (minutes), then cached by their inputs like every image
        export CONSOLIDATOR_IMAGE_CACHE=${CONSOLIDATOR_IMAGE_CACHE:-/var/tmp/consolidator-test-images}
        for spec in bookworm:uefi bullseye:bios; do
            release=${spec%:*} firmware=${spec#*:}
            say "image build debian --release $release --firmware $firmware (cached in $CONSOLIDATOR_IMAGE_CACHE)"
            "$VENV/bin/consolidator" image build debian --release "$release" \
                --firmware "$firmware" >&2
        done
        say "ruff (pyflakes checks)"
        "$VENV/bin/ruff" check consolidator tools tests
        say "lint-imports (the layering contract in pyproject.toml)"
        "$VENV/bin/lint-imports"
        if [ $# -gt 0 ]; then                 # a chosen selection: as asked, in one run
            say "pytest $*"
            set +e
            "$VENV/bin/python" -m pytest "$@"
            rc=$?
            set -e
            [ $rc -eq 5 ] && echo "pytest collected no tests: that is a failure" >&2
            exit $rc
        fi
        # The whole suite in three phases (tests/conftest.py): the real-OS boots (minutes
        # of one TCG core each) run beside the tests that do not measure the host's CPU,
        # then the tests that do run alone. The two cores are used; no measure is skewed.
        "$VENV/bin/python" -c "from pathlib import Path; from consolidator.vm.image import \
build_tiny; build_tiny(Path('$CONSOLIDATOR_IMAGE_CACHE'))" >/dev/null
        oslog=$(mktemp /tmp/consolidator-test-os.XXXXXX)
        say "pytest, phase os (real operating systems) beside phase shared; os's log: $oslog"
        set +e
        CONSOLIDATOR_TEST_PHASE=os "$VENV/bin/python" -m pytest -p no:cacheprovider \
            >"$oslog" 2>&1 &
        ospid=$!
        CONSOLIDATOR_TEST_PHASE=shared "$VENV/bin/python" -m pytest -p no:cacheprovider
        shared=$?
        wait $ospid
        osrc=$?
        say "pytest, phase os (its output)"
        cat "$oslog"
        rm -f "$oslog"
        # the real-OS tests leave gigabytes in writeback: let it finish, or the balloon
        # and memory tests of the quiet phase measure the host's flush
        sync
        say "pytest, phase quiet (tests that measure the host's CPU, alone)"
        CONSOLIDATOR_TEST_PHASE=quiet "$VENV/bin/python" -m pytest -p no:cacheprovider
        quiet=$?
        set -e
        say "phases: shared exit $shared, os exit $osrc, quiet exit $quiet"
        for rc in $shared $osrc $quiet; do
            [ $rc -eq 5 ] && echo "a phase collected no tests: that is a failure" >&2
            [ $rc -ne 0 ] && exit 1
        done
        exit 0
        ;;
    *)
        echo "usage: $0 run|test|setup [args]" >&2
        exit 2
        ;;
esac
