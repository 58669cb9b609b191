# Everything a fresh Debian 12 machine (as root) needs, installed on demand.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config erofs-utils docker-registry skopeo \
	qemu-utils qemu-system-x86 busybox-static cpio sqlite3 zstd mmdebstrap \
	linux-image-6.12-amd64 systemd util-linux apache2-utils openssl python3-venv
PYTEST_ARGS ?=

.PHONY: test lint deps system-deps venv bench demo demo-stop install-systemd clean

test: deps lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The tests that need nothing from the system (no root, FUSE, loop devices, msb, Debian
# tools): runnable by any user with the venv, no apt. See tests/conftest.py for the marking.
.PHONY: test-fast
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not system" $(PYTEST_ARGS)

lint: deps
	$(VENV)/bin/ruff check cachefs tests bench
	$(VENV)/bin/mypy

deps: system-deps $(VENV)/.installed

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

bench: deps
	$(PY) -m bench $(BENCH_ARGS)

demo: deps
	$(PY) -m cachefs.demo start --mountpoint ./mnt

demo-stop:
	$(PY) -m cachefs.demo stop --mountpoint ./mnt

# The service runs from its own environment, not this checkout's .venv: the service's
# user may be unable to read the checkout, and `make clean` would pull the floor from
# under it. PIP_INSTALL_ARGS e.g. "--no-index --find-links DIR" installs offline.
SERVICE_VENV ?= /opt/cachefs
SERVICE_PYTHON ?= python3
PIP_INSTALL_ARGS ?=
# The system unit's cache: $(SHARED_HOME)/cache, an msb home (MSB_HOME=$(SHARED_HOME) msb
# shares it), readable by the members of group $(SHARED_GROUP).
SHARED_HOME ?= /var/lib/cachefs
SHARED_GROUP ?= cachefs

install-systemd:
	umask 022 && { test -x $(SERVICE_VENV)/bin/python || $(SERVICE_PYTHON) -m venv $(SERVICE_VENV); }
	umask 022 && $(SERVICE_VENV)/bin/python -m pip install -q --upgrade $(PIP_INSTALL_ARGS) .
	ln -sfn $(SERVICE_VENV)/bin/cachefs /usr/local/bin/cachefs
	getent group $(SHARED_GROUP) >/dev/null || groupadd --system $(SHARED_GROUP)
	install -d -m 2750 -o root -g $(SHARED_GROUP) $(SHARED_HOME)
	install -m 0644 systemd/cachefs.service /etc/systemd/system/cachefs.service
	install -d /etc/systemd/user
	install -m 0644 systemd/cachefs-user.service /etc/systemd/user/cachefs.service
	test -e /etc/default/cachefs || install -m 0644 systemd/cachefs.default /etc/default/cachefs
	systemctl daemon-reload || true

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
