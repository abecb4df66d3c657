# cni-netkit node image: the node agent (`cni-netkit agent`) and the host
# artifact it installs as /opt/cni/bin/netkit on every node.
#
#   scripts/build-image                 (podman, base image built from Debian packages)
#   docker build -t cni-netkit:0.1.0 --build-arg VERSION=0.1.0 .   (BuildKit)
#
# The builder stage runs scripts/build-artifact and scripts/build-bpf, the
# same scripts the tests (tests/unit/test_artifact.py, via scripts/test)
# build and exercise, so the artifact in the image is the one CI ran.
# scripts/test-image takes the built image apart the way the DaemonSet uses it.
#
# Both stages are Debian bookworm with Debian's python3.11: the artifact
# bundles that libpython and needs glibc >= 2.36 on the node (bookworm's);
# the agent venv made in the builder runs on the same interpreter path in
# the final stage.
#
# Build hosts behind a TLS-intercepting proxy pass their CA bundle as the
# optional build secret `ca-bundle` (scripts/build-image does); pip then
# trusts it. It is mounted only while a RUN step runs: no layer holds it.

ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
# What the build scripts need, installed in a layer of its own so a code
# change does not download the toolchain again, from the same table the
# scripts install from (scripts/host-packages.list: build-artifact's
# python3.11 with venv and its shared libpython, binutils; build-shim's gcc
# and libc6-dev; build-bpf's clang, libbpf-dev and bpftool);
# ca-certificates for pip's TLS.
WORKDIR /src
COPY scripts/host-packages scripts/host-packages.list scripts/
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends ca-certificates \
 && scripts/host-packages install artifact shim bpf \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml ./
# The agent's dependencies (kubernetes included) in a layer of their own, so a
# code change reinstalls only the package itself further down.
RUN --mount=type=secret,id=ca-bundle \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python3.11 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' >/tmp/requirements.txt \
 && python3.11 -m venv /opt/cni-netkit/venv \
 && /opt/cni-netkit/venv/bin/pip install -q -r /tmp/requirements.txt
COPY scripts/build-artifact scripts/build-shim scripts/build-bpf scripts/
COPY bpf bpf
COPY cni_netkit cni_netkit
# The AF_XDP steering program, built by the script CI runs.
RUN scripts/build-bpf /out/bpf
# The host artifact. Its build venv (PyInstaller and the plugin's
# dependencies) and pip's downloads live in cache mounts, reused by the next
# build while the pins are unchanged; neither reaches the image.
RUN --mount=type=secret,id=ca-bundle \
    --mount=type=cache,target=/root/.cache/pip \
    --mount=type=cache,target=/var/cache/artifact-work \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && CNI_NETKIT_BUILD_WORK=/var/cache/artifact-work scripts/build-artifact /out/artifact
# The agent's own environment: the package, non-editable, on Debian's
# interpreter, next to its dependencies installed above. pip's
# byte-compiled .pyc files stay: the root filesystem is read-only in the
# DaemonSet, so without them every start and every `agent health` probe
# would compile the kubernetes client in memory again. Not needed at run
# time, and left out: pip and setuptools, and the kubernetes package's
# asyncio client (kubernetes/aio, 68 MB, a second copy of every API and model
# that nothing imports unless asked for: the agent uses the synchronous
# client; scripts/test-image runs the agent against an API server).
# README.md is the package's long description: copied only here, so editing
# it does not rebuild the artifact.
COPY README.md ./
RUN --mount=type=secret,id=ca-bundle \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && /opt/cni-netkit/venv/bin/pip install -q --no-deps /src \
 && /opt/cni-netkit/venv/bin/pip check \
 && /opt/cni-netkit/venv/bin/pip uninstall -q -y pip setuptools \
 && rm -rf /opt/cni-netkit/venv/lib/python3.11/site-packages/kubernetes/aio \
 && rm -rf /src/build /src/*.egg-info

# The KubeVirt hook sidecar, the netkit-afxdp network binding's sidecarImage
# (docs/kubevirt.md), a target of its own:
#   podman build --target kubevirt-binding -t kubevirt-netkit-binding:0.1.0 .
# Its venv holds the package with only what `cni-netkit kubevirt-binding`
# imports (structlog, and the `kubevirt` extra: grpcio, protobuf): no
# kubernetes, pyroute2 or pydantic, no artifact, no BPF object. It comes
# before the node image's stage so that stays the default target.
FROM ${DEBIAN_IMAGE} AS kubevirt-binding-builder
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends ca-certificates python3.11 python3.11-venv \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cni_netkit cni_netkit
RUN --mount=type=secret,id=ca-bundle \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python3.11 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print(*[d for d in p["dependencies"] if d.startswith("structlog")], *p["optional-dependencies"]["kubevirt"], sep="\n")' >/tmp/requirements.txt \
 && python3.11 -m venv /opt/cni-netkit/venv \
 && /opt/cni-netkit/venv/bin/pip install -q -r /tmp/requirements.txt \
 && /opt/cni-netkit/venv/bin/pip install -q --no-deps /src \
 && /opt/cni-netkit/venv/bin/pip uninstall -q -y pip setuptools \
 && rm -rf /src/build /src/*.egg-info

FROM ${DEBIAN_IMAGE} AS kubevirt-binding
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="cni-netkit-kubevirt-binding" \
      org.opencontainers.image.description="KubeVirt hook sidecar of the netkit-afxdp network binding: an AF_XDP virtio-net NIC on a cni-netkit lease" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3.11 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log
COPY --from=kubevirt-binding-builder /opt/cni-netkit/venv /opt/cni-netkit/venv
ENV PATH=/opt/cni-netkit/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin PYTHONDONTWRITEBYTECODE=1
# KubeVirt's qemu user, which the launcher pod's containers run as: the
# sidecar needs no privilege (a socket in the pod's hooks emptyDir, files
# read from the downward API).
USER 107:107
ENTRYPOINT ["cni-netkit", "kubevirt-binding"]

FROM ${DEBIAN_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="cni-netkit" \
      org.opencontainers.image.description="CNI plugin leasing physical NIC RX queues to netkit devices (Linux >= 7.0): node agent and host artifact" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# python3.11: the agent's interpreter (the venv points at /usr/bin/python3.11).
# ethtool: NIC preparation's ntuple rules and RSS contexts (kernel/ethtool.py).
# ca-certificates: none of ours, but the kubernetes client's TLS stack expects it.
# libbpf1: the agent loads the steering program through the system libbpf.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      python3.11 ethtool ca-certificates libbpf1 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log
COPY --from=builder /opt/cni-netkit/venv /opt/cni-netkit/venv
# Where the agent's default config looks for the artifact to install: the thin
# client `netkit`, the plugin `netkit-plugin` it falls back to, `_internal/`.
COPY --from=builder /out/artifact /opt/cni-netkit/artifact
# The path the DaemonSet's CNI_NETKIT_BPF_OBJECT names.
COPY --from=builder /out/bpf/xsk_redirect.bpf.o /opt/cni-netkit/bpf/xsk_redirect.bpf.o
ENV PATH=/opt/cni-netkit/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin PYTHONDONTWRITEBYTECODE=1
# Root, on purpose: the agent writes the host's /opt/cni/bin and the plugin's
# root-owned state dir (hostPath mounts), changes NIC RSS and ntuple
# settings (CAP_NET_ADMIN), and releases orphaned leases by deleting netkits
# inside pod netns (setns: CAP_SYS_ADMIN). The DaemonSet drops every other
# capability. Nothing in the image needs root to *build* or to run
# `cni-netkit agent health`.
USER 0:0
ENTRYPOINT ["cni-netkit"]
CMD ["agent"]
