# cni-netkit node image: the node agent (`cni-netkit agent`) and the host
# artifact it installs as /opt/cni/bin/netkit on every node.
#
#   docker build -t cni-netkit:0.1.0 --build-arg VERSION=0.1.0 .
#
# The builder stage runs scripts/build-artifact, the same script the tests
# (tests/unit/test_artifact.py, via scripts/test) build and exercise, so the
# artifact in the image is the one CI ran.
#
# Both stages are Debian bookworm with Debian's python3.11: the artifact
# bundles that libpython and needs glibc >= 2.36 on the node (bookworm's);
# the agent venv made in the builder runs on the same interpreter path in
# the final stage.

ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# ca-certificates: pip talks TLS to the package index. build-artifact installs
# the rest it needs itself through scripts/host-packages (python3.11 with its
# shared libpython, binutils; build-shim, which it runs for the thin client
# `netkit`, gcc and libc6-dev; build-bpf clang and libbpf-dev).
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scripts/host-packages scripts/host-packages.list scripts/
COPY scripts/build-artifact scripts/build-artifact
COPY scripts/build-shim scripts/build-shim
COPY scripts/build-bpf scripts/build-bpf
COPY bpf bpf
COPY cni_netkit cni_netkit
RUN scripts/build-artifact /out/artifact
# The AF_XDP steering program, built by the script CI runs (installs clang/libbpf-dev).
RUN scripts/build-bpf /out/bpf
# The agent's own environment: the package with all its dependencies
# (kubernetes included), non-editable, on Debian's interpreter.
RUN python3.11 -m venv /opt/cni-netkit/venv \
 && /opt/cni-netkit/venv/bin/pip install -q /src \
 && find /opt/cni-netkit/venv -name __pycache__ -prune -exec rm -rf {} +

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
 && apt-get install -y -qq --no-install-recommends python3.11 ethtool ca-certificates libbpf1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/cni-netkit/venv /opt/cni-netkit/venv
# Where the agent's default config looks for the artifact to install: the thin
# client `netkit`, the plugin `netkit-plugin` it falls back to, `_internal/`.
COPY --from=builder /out/artifact /opt/cni-netkit/artifact
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
