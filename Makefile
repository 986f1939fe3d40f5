# Developer entry points. The control plane is built from pinned Go modules
# (hack/tools/) into ~/.cache/fljob-operator/<versions>/bin and run on 127.0.0.1.
SHELL := /usr/bin/env bash

.PHONY: tools cluster-up cluster-down cluster-status kubeconfig test demo demo-down

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

demo: ## local cluster + chart + operator from this tree + the examples, watched live
	@hack/demo.sh

demo-down: ## stop the demo's operator and the cluster
	@hack/demo.sh down
