# Developer entry points. The control plane is built from pinned Go modules
# (hack/tools/) into ~/.cache/fljob-operator/<versions>/bin and run on 127.0.0.1.
SHELL := /usr/bin/env bash

.PHONY: tools cluster-up cluster-down cluster-status kubeconfig test demo demo-down e2e bench chaos

tools: ## build (or reuse) kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd, kwok, helm
	@hack/tools.sh >/dev/null

cluster-up: ## start the local control plane (no-op when already up)
	@hack/cluster.sh up

cluster-down: ## stop it and remove its state dir
	@hack/cluster.sh down

cluster-status:
	@hack/cluster.sh status

kubeconfig: ## print the admin kubeconfig path (use: make -s kubeconfig)
	@hack/cluster.sh kubeconfig

test: ## build tools, bring a cluster up if needed (down again after), cargo test
	@hack/test.sh

bench: ## scale benchmark against the local cluster, release build: N=1000 FLJobs vs raw pods vs NVFlare's polling (make bench N=10000; BENCH_ARGS=... for more flags)
	@hack/cluster.sh status >/dev/null || { echo "no healthy cluster: make cluster-up"; exit 1; }
	@source "$${FLJOB_CLUSTER_DIR:-/tmp/fljob-cluster}/env" && cargo bench --locked --bench scale -- --n $(or $(N),1000) $(BENCH_ARGS)

demo: ## local cluster + chart + operator from this tree + the examples, watched live
	@hack/demo.sh

demo-down: ## stop the demo's operator and the cluster
	@hack/demo.sh down

e2e: ## real NVFlare 2.9.0 jobs on the real node through the operator, and through NVFlare's own K8s launcher (python/tests/test_e2e.py)
	@FLJOB_REAL_NODES=1 hack/cluster.sh up
	@set -euo pipefail; D="$${FLJOB_CLUSTER_DIR:-/tmp/fljob-cluster}"; \
	  out="$$(hack/images.sh import "$$D/realnode/containerd.sock" worker)"; ref="$$(awk '$$1 == "worker" {print $$2}' <<<"$$out")"; \
	  cargo build --locked --bin fljob-operator; \
	  FLJOB_VENV="$${FLJOB_VENV:-$(CURDIR)/python/.venv}" python/run-tests.sh --version >/dev/null; \
	  cd python && FLJOB_REQUIRE_REAL_NODE=1 FLJOB_IMAGE_WORKER="$$ref" FLJOB_REAL_NODE="$${FLJOB_REAL_NODE_NAME:-real-node-0}" \
	  FLJOB_TEST_KUBECONFIG="$$(cd .. && hack/cluster.sh kubeconfig)" FLJOB_TOOLS_BIN="$$D/bin" \
	  FLJOB_OPERATOR_BIN="$(CURDIR)/target/debug/fljob-operator" \
	  "$${FLJOB_VENV:-$(CURDIR)/python/.venv}/bin/python" -m pytest -p no:cacheprovider -s -v \
	    tests/test_e2e.py

chaos: ## the full chaos run (tests/chaos.rs): 200 FLJobs, 12 operator SIGKILLs, an API server stop and an etcd restart on a control plane of its own (FLJOB_CHAOS_SEED=<seed> replays one)
	@hack/tools.sh >/dev/null
	@FLJOB_TOOLS_BIN="$$(hack/tools.sh --print-bin-dir)" FLJOB_CHAOS=full cargo test --locked --test chaos -- --nocapture
