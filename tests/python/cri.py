"""A tiny CRI client for the runtime tier: kubelet's calls, one per invocation, JSON out.

usage: cri.py SOCKET STUBS_DIR run NAME [HOSTPORT] -> {"sandbox", "container", "ip"}
       (with HOSTPORT the container answers "hello" on TCP 8080, mapped to HOSTPORT)
       cri.py SOCKET STUBS_DIR exec CID ARG...   -> {"exit", "stdout", "stderr"}
       cri.py SOCKET STUBS_DIR stop SANDBOX | remove SANDBOX | list | status
       cri.py SOCKET STUBS_DIR daemonset MANIFEST CONFIGMAP LAB.json
           -> {"sandbox", "init": [ID], "containers": {NAME: ID}, "probes"}
           (the DaemonSet's pod as kubelet runs it: init containers one by one to exit 0,
           then the containers; LAB.json as kubelet.daemonset_pod documents)
       cri.py SOCKET STUBS_DIR pid CID           -> {"pid"} (the container's first process)
"""
import json
import os
import sys
import time

SOCKET, STUBS = sys.argv[1], sys.argv[2]
sys.path.insert(0, STUBS)
import grpc  # noqa: E402
import api_pb2 as cri  # noqa: E402
import api_pb2_grpc  # noqa: E402

IMAGE = "vcnpath.test/busybox:1"
rt = api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel("unix://" + SOCKET))


def out(value):
    print(json.dumps(value))


def run(name, host_port=None):
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=name, namespace="e2e"),
        hostname=name,
        log_directory="",
        linux=cri.LinuxPodSandboxConfig(),
        port_mappings=[cri.PortMapping(protocol=cri.TCP, container_port=8080, host_port=int(host_port))]
        if host_port
        else [],
    )
    command = ["/bin/sleep", "2147483647"]
    if host_port:
        command = ["/bin/sh", "-c", "while true; do echo hello | /bin/busybox nc -l -p 8080; done"]
    try:
        sandbox = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
    except grpc.RpcError as e:
        out({"error": e.details()})
        sys.exit(1)
    container = rt.CreateContainer(
        cri.CreateContainerRequest(
            pod_sandbox_id=sandbox,
            config=cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name="main"),
                image=cri.ImageSpec(image=IMAGE),
                command=command,
                linux=cri.LinuxContainerConfig(),
            ),
            sandbox_config=config,
        ),
        timeout=60,
    ).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=container), timeout=60)
    status = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox), timeout=10)
    out({"sandbox": sandbox, "container": container, "ip": status.status.network.ip})


def wait_exited(container, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=container), timeout=10)
        if r.status.state == cri.CONTAINER_EXITED:
            return r.status
        time.sleep(0.2)
    raise SystemExit(f"container {container} still running after {timeout} s")


def container_log(lab, config):
    try:
        with open(os.path.join(lab["log_directory"], config.log_path)) as f:
            return f.read()
    except OSError:
        return ""


def daemonset(manifest, configmap, lab_file):
    from google.protobuf import json_format
    import kubelet

    with open(lab_file) as f:
        lab = json.load(f)
    pod = kubelet.daemonset_pod(manifest, [configmap], lab)
    config = json_format.ParseDict(pod["sandbox"], cri.PodSandboxConfig())
    try:
        sandbox = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
    except grpc.RpcError as e:
        out({"error": e.details()})
        sys.exit(1)

    def start(spec):
        c = json_format.ParseDict(spec, cri.ContainerConfig())
        try:
            cid = rt.CreateContainer(
                cri.CreateContainerRequest(pod_sandbox_id=sandbox, config=c, sandbox_config=config),
                timeout=60,
            ).container_id
            rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=60)
        except grpc.RpcError as e:
            out({"error": f"container {c.metadata.name}: {e.details()}", "sandbox": sandbox})
            sys.exit(1)
        return c, cid

    init = []
    for spec in pod["init"]:
        c, cid = start(spec)
        status = wait_exited(cid)
        if status.exit_code != 0:
            out({"error": f"init container {c.metadata.name} exited {status.exit_code}",
                 "sandbox": sandbox, "log": container_log(lab, c)})
            sys.exit(1)
        init.append(cid)
    containers = {}
    for spec in pod["containers"]:
        c, cid = start(spec)
        containers[c.metadata.name] = cid
    out({"sandbox": sandbox, "init": init, "containers": containers, "probes": pod["probes"]})


def main():
    command, args = sys.argv[3], sys.argv[4:]
    if command == "run":
        run(*args)
    elif command == "exec":
        r = rt.ExecSync(cri.ExecSyncRequest(container_id=args[0], cmd=args[1:], timeout=20), timeout=30)
        out({"exit": r.exit_code, "stdout": r.stdout.decode(), "stderr": r.stderr.decode()})
    elif command == "stop":
        rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=args[0]), timeout=60)
        out({})
    elif command == "remove":
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=args[0]), timeout=60)
        out({})
    elif command == "list":
        r = rt.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=10)
        out([s.id for s in r.items])
    elif command == "daemonset":
        daemonset(*args)
    elif command == "pid":
        r = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=args[0], verbose=True), timeout=10)
        out({"pid": json.loads(r.info["info"])["pid"]})
    elif command == "status":
        r = rt.Status(cri.StatusRequest(), timeout=10)
        out({c.type: c.status for c in r.status.conditions})
    else:
        sys.exit(f"unknown command {command}")


main()
