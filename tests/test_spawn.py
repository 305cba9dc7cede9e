"""An emulated cluster's devices are forked from the CLI process after its imports (edge_llm.spawn):
each is the cluster's own child in a session of its own, runs the command line it is given as a new
interpreter would, and a fork that was never needed exits when the cluster is done with it."""

import os

import psutil
import pytest
from cluster_proc import ClusterProcess

from edge_llm.spawn import DeviceForks
from transport.auth import SECRET_ENV


def test_forks_never_launched_exit_and_are_collected():
    with DeviceForks(2) as forks:
        children = list(forks._ready)
        assert all(psutil.Process(c.pid).ppid() == os.getpid() for c in children)
    assert [c.returncode for c in children] == [0, 0]
    for child in children:
        with pytest.raises(ChildProcessError):  # collected: no zombie left
            os.waitpid(child.pid, os.WNOHANG)


@pytest.mark.parametrize("forked", [1, 0], ids=["forked", "new-interpreter"])
@pytest.mark.parametrize(("env", "says"), [({}, "a device needs the cluster's secret"),
                                           ({SECRET_ENV: "short"}, "must be at least 16 bytes")])
def test_a_device_runs_its_command_line_and_environment_as_the_cli_does(capfd, monkeypatch, forked, env, says):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with DeviceForks(forked) as forks:
        device = forks.launch(["worker", "--rank", "1", "--master", "127.0.0.1:1"], env)
        assert device.wait(timeout=60) == 2
    assert SECRET_ENV not in os.environ  # what the device was given stays the device's
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edge-llm: error: ") and says in err[0], err


def test_the_cluster_forks_its_devices_each_in_a_session_of_its_own(tiny_model, tmp_path):
    cluster = ClusterProcess(tiny_model, 3, tmp_path, "--attention-nodes", "1")
    try:
        devices = [(f"rank {r}", pid) for r, pid in cluster.worker_pids.items()] + \
            [(f"node {n}", pid) for n, pid in cluster.node_pids.items()]
        assert len(devices) == 3
        for name, pid in devices:
            process = psutil.Process(pid)
            assert process.ppid() == cluster.proc.pid  # the cluster's own child, which its reaper waits for
            assert process.name() == f"edge-llm {name}"  # forked: a new interpreter would be 'python'
            assert os.getsid(pid) == pid != os.getsid(cluster.proc.pid)  # Ctrl-C at a terminal reaches the cluster only
    finally:
        cluster.stop()
