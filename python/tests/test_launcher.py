import argparse
import json
import os
import uuid

import pytest
from kubernetes.client.rest import ApiException
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContextManager
from nvflare.apis.job_launcher_spec import JobLauncherSpec, JobProcessArgs, JobReturnCode
from nvflare.app_opt.job_launcher.workspace_cell_transfer import WorkspaceTransferManager
from nvflare.private.fed.app.fl_conf import FLClientStarterConfiger
from nvflare.private.fed.utils.fed_utils import get_job_launcher

from executor_harness import FakeEngine
from fake_k8s import secret_values
from fljob_launcher import FLJobHandle, FLJobLauncher, fljob_name

NS = "fl-site-a"


def make_launcher(cluster, **kwargs):
    kwargs.setdefault("namespace", NS)
    kwargs.setdefault("site", "site-a")
    launcher = FLJobLauncher(**kwargs)
    launcher.use_apis(cluster.custom, cluster.core)
    return launcher


def make_ctx(launcher, client_name="site-1", creds=("tok", "sig", "ssid"), set_options=("secure_train=true",)):
    """An FLContext carrying what JobExecutor.start_app puts there before launch_job."""
    engine = FakeEngine(client_name, [launcher])
    fl_ctx = engine.new_context()
    job_args = {
        JobProcessArgs.EXE_MODULE: ("-m", "nvflare.private.fed.app.client.worker_process"),
        JobProcessArgs.OPTIONS: ("--set", " ".join(list(set_options) + ["print_conf=True"])),
    }
    if creds:
        job_args[JobProcessArgs.AUTH_TOKEN] = ("-t", creds[0])
        job_args[JobProcessArgs.TOKEN_SIGNATURE] = ("-ts", creds[1])
        job_args[JobProcessArgs.SSID] = ("-d", creds[2])
    fl_ctx.set_prop(FLContextKey.JOB_PROCESS_ARGS, job_args, private=True, sticky=False)
    fl_ctx.set_prop(
        FLContextKey.ARGS,
        argparse.Namespace(set=list(set_options), workspace=f"/var/tmp/ws-{client_name}"),
        private=True,
        sticky=False,
    )
    return fl_ctx


def transfer_manager(fl_ctx):
    """The WorkspaceTransferManager NVFlare keeps on the parent's cell (the one the launcher registered jobs with)."""
    return WorkspaceTransferManager.get_or_create(fl_ctx.get_engine().cell)


def creds_of(cluster, name):
    """The Secret's values without the (random) transfer token, and that token."""
    values = secret_values(cluster.secret(NS, f"{name}-creds"))
    return {k: v for k, v in values.items() if k != "transferToken"}, values.get("transferToken")


def job_meta(job_id=None, **extra):
    meta = {"job_id": job_id or str(uuid.uuid4()), "name": "hello-numpy", "deploy_map": {"app": ["@ALL"]}}
    meta.update(extra)
    return meta


class TestSelection:
    def test_is_a_job_launcher_spec(self):
        assert isinstance(FLJobLauncher(namespace=NS), JobLauncherSpec)

    def test_selected_by_nvflare_get_job_launcher(self, cluster):
        launcher = make_launcher(cluster)
        fl_ctx = make_ctx(launcher)
        # NVFlare's own selection: BEFORE_JOB_LAUNCH is fired, launchers add_launcher() themselves, exactly one wins
        assert get_job_launcher(job_meta(), fl_ctx) is launcher

    def test_ignores_other_events(self, cluster):
        launcher = make_launcher(cluster)
        ctx = FLContextManager(identity_name="site-1").new_context()
        launcher.handle_event(EventType.JOB_COMPLETED, ctx)
        assert ctx.get_prop(FLContextKey.JOB_LAUNCHER) is None
        launcher.handle_event(EventType.BEFORE_JOB_LAUNCH, ctx)
        assert ctx.get_prop(FLContextKey.JOB_LAUNCHER) == [launcher]

    def test_built_from_site_resources_json(self, tmp_path):
        """The site's local/resources.json component entry is built by NVFlare's own client configurator."""
        ws = tmp_path / "ws"
        (ws / "startup").mkdir(parents=True)
        (ws / "local").mkdir()
        (ws / "startup" / "fed_client.json").write_text(
            json.dumps(
                {
                    "format_version": 2,
                    "servers": [{"name": "proj", "service": {"target": "server:8002", "scheme": "grpc"}}],
                    "client": {"ssl_private_key": "client.key", "ssl_cert": "client.crt", "ssl_root_cert": "r.pem"},
                }
            )
        )
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text("")
        (ws / "local" / "resources.json").write_text(
            json.dumps(
                {
                    "format_version": 2,
                    "components": [
                        {
                            "id": "resource_manager",
                            "path": "nvflare.app_common.resource_managers.passthrough_resource_manager."
                            "PassthroughResourceManager",
                            "args": {},
                        },
                        {
                            "id": "fljob_launcher",
                            "path": "fljob_launcher.FLJobLauncher",
                            "args": {
                                "namespace": NS,
                                "site": "site-a",
                                "kubeconfig": str(kubeconfig),
                                "abort_grace_period_seconds": 15,
                                "pod_annotations": {"example.org/team": "ml"},
                            },
                        },
                    ],
                }
            )
        )
        from nvflare.apis.workspace import Workspace

        args = argparse.Namespace(workspace=str(ws), job_id=None, set=[])
        configer = FLClientStarterConfiger(Workspace(str(ws), "site-1"), args=args, kv_list=["uid=site-1"])
        configer.configure()
        launcher = configer.components["fljob_launcher"]
        assert isinstance(launcher, FLJobLauncher)
        assert launcher in configer.handlers  # so the client engine fires BEFORE_JOB_LAUNCH at it
        assert launcher.namespace == NS and launcher.site == "site-a"
        assert launcher.kubeconfig == str(kubeconfig)
        assert launcher.abort_grace_period_seconds == 15
        assert launcher.pod_annotations == {"example.org/team": "ml"}

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"namespace": ""},
            {"abort_grace_period_seconds": -1},
            {"abort_grace_period_seconds": True},
            {"terminate_grace_period_seconds": -1},
            {"terminate_grace_period_seconds": 1.5},
            {"terminate_grace_period_seconds": 3601},
            {"pod_annotations": ["a"]},
            {"kubeconfig": "a", "config_file_path": "b"},
            {"pod_template": {"kind": "Pod"}},
        ],
    )
    def test_bad_args(self, kwargs):
        kwargs.setdefault("namespace", NS)
        with pytest.raises(ValueError):
            FLJobLauncher(**kwargs)

    def test_config_file_path_alias(self):
        assert FLJobLauncher(namespace=NS, config_file_path="/k").kubeconfig == "/k"


class TestLaunch:
    def test_creates_fljob_and_owned_secret(self, cluster):
        launcher = make_launcher(
            cluster,
            image="nvflare/nvflare:2.9.0",
            abort_grace_period_seconds=20,
            active_deadline_seconds=3600,
            ttl_seconds_after_finished=600,
            pod_annotations={"sim.fljob.dev/exit-code": "102"},
            pod_labels={"team": "ml"},
        )
        meta = job_meta(resource_spec={"site-1": {"num_of_gpus": 1, "mem_per_gpu_in_GiB": 4}})
        fl_ctx = make_ctx(launcher)
        handle = launcher.launch_job(meta, fl_ctx)
        assert isinstance(handle, FLJobHandle)

        [fljob] = cluster.fljobs()
        name = fljob_name(meta["job_id"], "site-a")
        assert fljob["metadata"]["name"] == name == handle.name
        assert fljob["metadata"]["namespace"] == NS
        assert fljob["metadata"]["labels"]["fljob.dev/site"] == "site-a"
        spec = fljob["spec"]
        assert spec["jobId"] == meta["job_id"]
        assert spec["site"] == "site-a"
        assert spec["meta"] == meta
        assert spec["options"] == ["secure_train=true"]
        assert spec["resources"] == {"gpus": 1}
        assert spec["image"] == "nvflare/nvflare:2.9.0"
        assert spec["abortGracePeriodSeconds"] == 20
        assert spec["activeDeadlineSeconds"] == 3600
        assert spec["ttlSecondsAfterFinished"] == 600
        assert spec["podTemplate"] == {
            "metadata": {"annotations": {"sim.fljob.dev/exit-code": "102"}, "labels": {"team": "ml"}}
        }
        assert spec["credentialsSecret"] == f"{name}-creds"
        assert "abort" not in spec
        # the parent cell's FQCN: NVFL_WORKSPACE_OWNER_FQCN in the pod
        assert spec["workspaceOwner"] == "site-1"

        secret = cluster.secret(NS, f"{name}-creds")
        creds, token = creds_of(cluster, name)
        assert creds == {"token": "tok", "signature": "sig", "ssid": "ssid"}
        # the job is registered with NVFlare's WorkspaceTransferManager for the parent's workspace, under that token
        record = transfer_manager(fl_ctx).jobs[meta["job_id"]]
        assert token and record.transfer_token == token
        assert record.workspace_root == "/var/tmp/ws-site-1"
        # no credential, no transfer token in the FLJob itself
        assert "tok" not in json.dumps(fljob) and token not in json.dumps(fljob)
        [owner] = secret["metadata"]["ownerReferences"]
        assert owner["uid"] == fljob["metadata"]["uid"]
        assert (owner["apiVersion"], owner["kind"], owner["name"]) == ("fljob.dev/v1alpha1", "FLJob", name)
        # the Secret is created before the FLJob (the operator's pod must find it), then owned by it
        creates = [k for v, k in cluster.calls if v == "create"]
        assert creates == ["Secret", "FLJob"]
        assert ("patch", "Secret") in cluster.calls

    def test_pod_template_merge(self, cluster):
        launcher = make_launcher(
            cluster,
            pod_template={
                "metadata": {"annotations": {"a": "1", "b": "1"}},
                "spec": {"nodeSelector": {"gpu": "a100"}, "priorityClassName": "fl"},
            },
            pod_annotations={"b": "2"},
            pod_labels={"team": "ml"},
        )
        launcher.launch_job(job_meta(), make_ctx(launcher))
        assert cluster.fljobs()[0]["spec"]["podTemplate"] == {
            "metadata": {"annotations": {"a": "1", "b": "2"}, "labels": {"team": "ml"}},
            "spec": {"nodeSelector": {"gpu": "a100"}, "priorityClassName": "fl"},
        }
        # the launcher's own template is not modified by a launch
        assert launcher.pod_template["metadata"]["annotations"] == {"a": "1", "b": "1"}

    def test_site_defaults_to_client_name(self, cluster):
        launcher = make_launcher(cluster, site=None)
        meta = job_meta()
        launcher.launch_job(meta, make_ctx(launcher, client_name="site-7"))
        [fljob] = cluster.fljobs()
        assert fljob["spec"]["site"] == "site-7"
        assert "image" not in fljob["spec"] and "resources" not in fljob["spec"]

    def test_job_image_wins(self, cluster):
        launcher = make_launcher(cluster, image="site-default:1")
        meta = job_meta(launcher_spec={"site-1": {"k8s": {"image": "job-image:2"}}})
        launcher.launch_job(meta, make_ctx(launcher))
        assert cluster.fljobs()[0]["spec"]["image"] == "job-image:2"

    def test_without_credentials_uses_site_secret(self, cluster):
        launcher = make_launcher(cluster)
        launcher.launch_job(job_meta(), make_ctx(launcher, creds=None))
        [fljob] = cluster.fljobs()
        assert "credentialsSecret" not in fljob["spec"]
        assert cluster.count("create", "Secret") == 0

    def test_per_job_credentials_off(self, cluster):
        launcher = make_launcher(cluster, per_job_credentials=False)
        launcher.launch_job(job_meta(), make_ctx(launcher))
        assert "credentialsSecret" not in cluster.fljobs()[0]["spec"]
        assert cluster.count("create", "Secret") == 0

    def test_existing_secret_is_updated_and_reowned(self, cluster):
        launcher = make_launcher(cluster)
        meta = job_meta()
        name = fljob_name(meta["job_id"], "site-a")
        cluster.core.create_namespaced_secret(
            NS,
            {"metadata": {"name": f"{name}-creds"}, "stringData": {"token": "old"}, "type": "Opaque"},
            _request_timeout=5,
        )
        launcher.launch_job(meta, make_ctx(launcher, creds=("new", "sig2", "ssid2")))
        secret = cluster.secret(NS, f"{name}-creds")
        assert creds_of(cluster, name)[0] == {"token": "new", "signature": "sig2", "ssid": "ssid2"}
        assert secret["metadata"]["ownerReferences"][0]["uid"] == cluster.fljobs()[0]["metadata"]["uid"]

    def test_secret_failure_rolls_back(self, cluster):
        launcher = make_launcher(cluster)
        cluster.fail_next["create-Secret"] = ApiException(status=403, reason="Forbidden")
        with pytest.raises(ApiException):
            launcher.launch_job(job_meta(), make_ctx(launcher))
        assert cluster.fljobs() == []

    def test_relaunch_of_running_job_adopts_it(self, cluster):
        launcher = make_launcher(cluster)
        meta = job_meta()
        h1 = launcher.launch_job(meta, make_ctx(launcher))
        cluster.set_status(h1.name, {"phase": "Running"})
        uid = cluster.fljobs()[0]["metadata"]["uid"]
        h2 = launcher.launch_job(meta, make_ctx(launcher, creds=("t2", "s2", "d2")))
        assert h2.name == h1.name
        [fljob] = cluster.fljobs()
        assert fljob["metadata"]["uid"] == uid and fljob["status"]["phase"] == "Running"
        assert creds_of(cluster, h1.name)[0]["token"] == "t2"

    def test_secret_failure_keeps_an_adopted_job(self, cluster):
        launcher = make_launcher(cluster)
        meta = job_meta()
        h1 = launcher.launch_job(meta, make_ctx(launcher))
        cluster.set_status(h1.name, {"phase": "Running"})
        cluster.fail_next["create-Secret"] = ApiException(status=403, reason="Forbidden")
        cluster.delete("Secret", NS, f"{h1.name}-creds")
        with pytest.raises(ApiException):
            launcher.launch_job(meta, make_ctx(launcher))
        assert [j["metadata"]["name"] for j in cluster.fljobs()] == [h1.name]

    def test_relaunch_of_finished_job_replaces_it(self, cluster):
        launcher = make_launcher(cluster)
        meta = job_meta()
        h1 = launcher.launch_job(meta, make_ctx(launcher))
        cluster.set_status(h1.name, {"phase": "Failed", "exitCode": 101})
        old_uid = cluster.fljobs()[0]["metadata"]["uid"]
        h2 = launcher.launch_job(meta, make_ctx(launcher))
        [fljob] = cluster.fljobs()
        assert fljob["metadata"]["uid"] != old_uid and "status" not in fljob
        assert h2.poll() is None
        secret = cluster.secret(NS, f"{h2.name}-creds")
        assert secret["metadata"]["ownerReferences"][0]["uid"] == fljob["metadata"]["uid"]

    def test_name_taken_by_another_job(self, cluster):
        launcher = make_launcher(cluster)
        meta = job_meta()
        launcher.launch_job(meta, make_ctx(launcher))
        name = cluster.fljobs()[0]["metadata"]["name"]
        cluster.patch("FLJob", NS, name, {"spec": {"jobId": "someone-else"}}, notify=False)
        with pytest.raises(RuntimeError, match="another job"):
            launcher.launch_job(meta, make_ctx(launcher))

    def test_missing_job_id(self, cluster):
        launcher = make_launcher(cluster)
        with pytest.raises(RuntimeError):
            launcher.launch_job({"name": "x"}, make_ctx(launcher))

    def test_start_timeout_aborts_with_exception_code(self, cluster, sim_operator):
        launcher = make_launcher(cluster, timeout=0.5)
        handle = launcher.launch_job(job_meta(), make_ctx(launcher))  # stays Pending: nobody admits it
        [fljob] = cluster.fljobs()
        assert fljob["spec"]["abort"] is True
        assert fljob["spec"]["abortGracePeriodSeconds"] == 0  # nothing to wait for: the job never ran
        handle.wait(timeout=5)
        assert handle.poll() == JobReturnCode.EXCEPTION

    @pytest.mark.parametrize("abort_grace,terminate_grace,expected", [(None, 5, 5), (2, 5, 2), (20, None, 20)])
    def test_terminate_grace_never_above_abort_grace(self, cluster, sim_operator, abort_grace, terminate_grace,
                                                     expected):
        launcher = make_launcher(
            cluster, timeout=0.3, abort_grace_period_seconds=abort_grace, terminate_grace_period_seconds=terminate_grace
        )
        launcher.launch_job(job_meta(), make_ctx(launcher))
        [fljob] = cluster.fljobs()
        assert fljob["spec"]["abort"] is True
        assert fljob["spec"]["abortGracePeriodSeconds"] == expected

    def test_start_timeout_not_hit(self, cluster):
        launcher = make_launcher(cluster, timeout=5)
        meta = job_meta()
        name = fljob_name(meta["job_id"], "site-a")
        cluster.later(0.3, cluster.set_status, name, {"phase": "Running", "clientStatus": "started"})
        handle = launcher.launch_job(meta, make_ctx(launcher))
        assert "abort" not in cluster.fljobs()[0]["spec"]
        assert handle.poll() is None

    def test_in_cluster_config_required_without_kubeconfig(self, monkeypatch):
        from kubernetes.config import ConfigException

        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        launcher = FLJobLauncher(namespace=NS)
        with pytest.raises(ConfigException):
            launcher._apis()

    def test_kubeconfig_client(self, tmp_path):
        kubeconfig = tmp_path / "kc"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
                    "users": [{"name": "u", "user": {"token": "abc"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            )
        )
        launcher = FLJobLauncher(namespace=NS, kubeconfig=str(kubeconfig))
        custom, core = launcher._apis()
        assert custom.api_client.configuration.host == "https://127.0.0.1:6443"
        assert core.api_client is custom.api_client


def test_no_env_leak(cluster):
    # the launcher never writes credentials into the environment of the parent process
    launcher = make_launcher(cluster)
    launcher.launch_job(job_meta(), make_ctx(launcher))
    assert "NVFLARE_JOB_AUTH_TOKEN" not in os.environ
