# Everything a fresh Debian 12 machine (as root) needs, installed on demand.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config erofs-utils docker-registry skopeo \
	qemu-utils qemu-system-x86 busybox-static cpio sqlite3 zstd mmdebstrap \
	linux-image-6.12-amd64 systemd util-linux apache2-utils openssl
PYTEST_ARGS ?=

.PHONY: test lint deps system-deps venv bench demo demo-stop install-systemd clean

test: deps lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: deps
	$(VENV)/bin/ruff check cachefs tests bench

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

install-systemd:
	install -m 0644 systemd/cachefs.service /etc/systemd/system/cachefs.service
	install -d /etc/systemd/user
	install -m 0644 systemd/cachefs-user.service /etc/systemd/user/cachefs.service
	test -e /etc/default/cachefs || install -m 0644 systemd/cachefs.default /etc/default/cachefs
	ln -sf $(abspath $(VENV))/bin/cachefs /usr/local/bin/cachefs
	systemctl daemon-reload || true

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
