import argparse
import re
import uuid

import pytest
from nvflare.apis.job_launcher_spec import JobProcessArgs, JobReturnCode
from nvflare.fuel.common.exit_codes import ProcessExitCode

from fljob_launcher.mapping import (
    credentials_from_job_args,
    credentials_secret_name,
    fljob_name,
    job_image_for_site,
    json_safe,
    label_value,
    options_from_context,
    resources_for_site,
    return_code_from_status,
)

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class TestNames:
    def test_uuid_job_id(self):
        job_id = "3F2A9C10-1234-4abc-9def-0123456789ab"
        name = fljob_name(job_id, "site-a")
        assert name.startswith("nvf-3f2a9c10-1234-4abc-9def-0123456789ab-")
        assert DNS_LABEL.match(name) and len(name) <= 63
        assert name == fljob_name(job_id, "site-a")  # deterministic

    def test_site_and_collisions(self):
        job_id = str(uuid.uuid4())
        assert fljob_name(job_id, "site-a") != fljob_name(job_id, "site-b")
        # two ids that sanitize alike still get different names
        assert fljob_name("Job_1", "s") != fljob_name("job-1", "s")

    @pytest.mark.parametrize("job_id", ["x" * 200, "--Weird__ID!!with spaces--", "..", "9" * 70, "a"])
    def test_odd_ids_are_valid_labels(self, job_id):
        name = fljob_name(job_id, "site-1")
        assert DNS_LABEL.match(name), name
        assert len(name) <= 63
        assert len(credentials_secret_name(name)) <= 253

    def test_empty_id(self):
        with pytest.raises(ValueError):
            fljob_name("", "site-1")

    @pytest.mark.parametrize("text", ["site-1", "Site_A.b", "x" * 100, "-a-", "a b/c"])
    def test_label_value(self, text):
        v = label_value(text)
        assert LABEL_VALUE.match(v) and len(v) <= 63


class TestReturnCodes:
    @pytest.mark.parametrize("phase", ["Pending", "Queued", "Starting", "Running", "Aborting", None, "Unknown"])
    def test_not_finished(self, phase):
        assert return_code_from_status({"phase": phase, "exitCode": 3}) is None
        assert return_code_from_status(None) is None

    @pytest.mark.parametrize(
        "phase,exit_code,expected",
        [
            ("Succeeded", 0, JobReturnCode.SUCCESS),
            ("Failed", 1, JobReturnCode.EXECUTION_ERROR),
            ("Failed", 101, ProcessExitCode.EXCEPTION),
            ("Failed", 102, ProcessExitCode.UNSAFE_COMPONENT),
            ("Failed", 103, ProcessExitCode.CONFIG_ERROR),
            ("Failed", 104, ProcessExitCode.INFRASTRUCTURE_ERROR),
            ("Failed", 9, JobReturnCode.ABORTED),  # Evicted
            ("Failed", 127, JobReturnCode.UNKNOWN),  # PodLost
            ("Aborted", 9, JobReturnCode.ABORTED),
            ("Aborted", 0, JobReturnCode.SUCCESS),  # the worker finished by itself within the grace period
            ("Failed", 137, JobReturnCode.EXECUTION_ERROR),  # OOMKilled
            ("Failed", 2, JobReturnCode.EXECUTION_ERROR),
            ("Failed", "102", ProcessExitCode.UNSAFE_COMPONENT),
            ("Succeeded", None, JobReturnCode.SUCCESS),
            ("Aborted", None, JobReturnCode.ABORTED),
            ("Failed", None, JobReturnCode.UNKNOWN),
            ("Failed", "garbage", JobReturnCode.UNKNOWN),
        ],
    )
    def test_finished(self, phase, exit_code, expected):
        assert return_code_from_status({"phase": phase, "exitCode": exit_code}) == expected

    def test_nvflare_constants(self):
        # the codes NVFlare 2.9 uses; the operator's status.exitCode contract is built on them
        assert (JobReturnCode.SUCCESS, JobReturnCode.EXECUTION_ERROR, JobReturnCode.ABORTED) == (0, 1, 9)
        assert JobReturnCode.UNKNOWN == 127
        assert (JobReturnCode.EXCEPTION, JobReturnCode.UNSAFE_COMPONENT) == (101, 102)
        assert (JobReturnCode.CONFIG_ERROR, JobReturnCode.INFRASTRUCTURE_ERROR) == (103, 104)


class TestResources:
    def test_legacy_flat_spec(self):
        meta = {"resource_spec": {"site-1": {"num_of_gpus": 2, "mem_per_gpu_in_GiB": 8}}}
        assert resources_for_site(meta, "site-1") == {"gpus": 2}
        assert resources_for_site(meta, "site-2") == {}

    def test_portable_spec_with_default(self):
        meta = {
            "resource_spec": {
                "@default": {"num_of_cpus": 2, "memory": "8Gi"},
                "site-1": {"num_of_gpus": 1},
            }
        }
        assert resources_for_site(meta, "site-1") == {"gpus": 1, "cpu": "2", "memory": "8Gi"}
        assert resources_for_site(meta, "site-2") == {"cpu": "2", "memory": "8Gi"}

    def test_k8s_launcher_spec(self):
        meta = {
            "launcher_spec": {
                "default": {"k8s": {"image": "nvflare/nvflare:2.9.0", "memory": "2Gi"}},
                "site-1": {"k8s": {"num_of_gpus": 1, "cpu": "500m", "image": "custom:1"}},
            }
        }
        assert resources_for_site(meta, "site-1") == {"gpus": 1, "cpu": "500m", "memory": "2Gi"}
        assert job_image_for_site(meta, "site-1") == "custom:1"
        assert job_image_for_site(meta, "site-2") == "nvflare/nvflare:2.9.0"
        assert job_image_for_site({}, "site-1") is None

    def test_zero_gpus_omitted(self):
        assert resources_for_site({"resource_spec": {"site-1": {"num_of_gpus": 0}}}, "site-1") == {}

    def test_invalid_rejected_by_nvflare(self):
        with pytest.raises(ValueError):
            resources_for_site({"resource_spec": {"site-1": {"memory": "lots"}}}, "site-1")


class TestContext:
    def test_options_from_args(self):
        args = argparse.Namespace(set=["secure_train=true", "print_conf=True", "junk", "a=b"])
        assert options_from_context(args, None) == ["secure_train=true", "a=b"]

    def test_options_must_fit_the_crd(self):
        dropped = []
        args = argparse.Namespace(set=["ok=1", "has space=1", "1bad=x", "v=a b", "x" * 300 + "=1", "ok=1"])
        assert options_from_context(args, None, dropped) == ["ok=1"]
        assert len(dropped) == 4

    def test_options_from_job_process_args(self):
        job_args = {JobProcessArgs.OPTIONS: ("--set", " secure_train=true x=1 print_conf=True")}
        assert options_from_context(None, job_args) == ["secure_train=true", "x=1"]
        assert options_from_context(None, None) == []

    def test_credentials(self):
        job_args = {
            JobProcessArgs.AUTH_TOKEN: ("-t", "tok"),
            JobProcessArgs.TOKEN_SIGNATURE: ("-ts", "sig"),
            JobProcessArgs.SSID: ("-d", "ssid"),
            JobProcessArgs.JOB_ID: ("-n", "j"),
        }
        assert credentials_from_job_args(job_args) == {"token": "tok", "signature": "sig", "ssid": "ssid"}
        job_args[JobProcessArgs.SSID] = ("-d", None)
        assert credentials_from_job_args(job_args) == {"token": "tok", "signature": "sig"}
        assert credentials_from_job_args(None) == {}

    def test_json_safe(self):
        class Odd:
            def __str__(self):
                return "odd"

        assert json_safe({"a": (1, 2), "b": Odd()}) == {"a": [1, 2], "b": "odd"}
