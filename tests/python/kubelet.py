"""What kubelet hands the runtime for one pod of a DaemonSet: the CRI sandbox and container
configs built from the manifest's pod template, the way kubelet builds them (kuberuntime's
sandbox, container and security-context code), for the runtime tier.

Only what the shipped manifests use is translated; anything else is refused by name, so a
manifest change the translation does not understand fails the test instead of being
silently dropped.
"""
import os
import re
import socket

import yaml

# kubelet's DefaultProcMount: the paths it asks the runtime to mask and to mount read-only
# (k8s.io/kubernetes pkg/securitycontext, the same list as runc's and containerd's).
MASKED_PATHS = [
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

# CRI NamespaceMode.
POD, CONTAINER, NODE = 0, 1, 2

KNOWN_CONTAINER_KEYS = {
    "name", "image", "command", "args", "env", "ports", "readinessProbe", "livenessProbe",
    "resources", "securityContext", "volumeMounts",
}
KNOWN_SECURITY_KEYS = {
    "runAsUser", "capabilities", "privileged", "readOnlyRootFilesystem",
    "allowPrivilegeEscalation",
}


def load_all(path):
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def find(docs, kind):
    found = [d for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        raise SystemExit(f"expected one {kind}, found {len(found)}")
    return found[0]


def expand(text, env):
    """Kubernetes' $(VAR) expansion: a variable defined earlier is replaced, $$ is a literal
    $, anything else is left as written."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, text)


def field_ref(path, pod):
    values = {
        "metadata.name": pod["name"],
        "metadata.namespace": pod["namespace"],
        "spec.nodeName": pod["node_name"],
        "status.hostIP": pod["host_ip"],
        # A hostNetwork pod's IP is the node's.
        "status.podIP": pod["host_ip"],
    }
    if path not in values:
        raise SystemExit(f"fieldRef {path} is not translated by tests/python/kubelet.py")
    return values[path]


def envs(container, pod, extra):
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            value = expand(var["value"], env)
        elif "fieldRef" in var.get("valueFrom", {}):
            value = field_ref(var["valueFrom"]["fieldRef"]["fieldPath"], pod)
        else:
            raise SystemExit(f"env {var['name']}: only value and fieldRef are translated")
        env[var["name"]] = value
    env.update(extra)
    return env


def quantity_bytes(q):
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 1000, "M": 10**6, "G": 10**9}
    for unit, factor in units.items():
        if str(q).endswith(unit):
            return int(str(q)[: -len(unit)]) * factor
    return int(q)


def milli_cpu(q):
    q = str(q)
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def host_path_of(volume, node_root, configmap_dir):
    """The node path a volume stands for; kubelet's hostPath type checks and creation are
    made through `node_root` (the runtime's view of the node's file system)."""
    if "hostPath" in volume:
        path, kind = volume["hostPath"]["path"], volume["hostPath"].get("type", "")
        seen = node_root + path
        if kind == "DirectoryOrCreate":
            os.makedirs(seen, mode=0o755, exist_ok=True)
        elif kind == "Directory" and not os.path.isdir(seen):
            raise SystemExit(f"hostPath {path} (type Directory) does not exist on the node")
        elif kind not in ("", "DirectoryOrCreate", "Directory"):
            raise SystemExit(f"hostPath type {kind} is not translated")
        return path, False
    if "configMap" in volume:
        # kubelet mounts configMap volumes read-only.
        return os.path.join(configmap_dir, volume["configMap"]["name"]), True
    raise SystemExit(f"volume {volume['name']}: only hostPath and configMap are translated")


def security_context(sc, namespaces, lacking):
    unknown = set(sc) - KNOWN_SECURITY_KEYS
    if unknown:
        raise SystemExit(f"securityContext keys not translated: {sorted(unknown)}")
    privileged = bool(sc.get("privileged", False))
    out = {
        "namespaceOptions": namespaces,
        "privileged": privileged,
        "readonlyRootfs": bool(sc.get("readOnlyRootFilesystem", False)),
        # allowPrivilegeEscalation: false sets no_new_privs; unset leaves it off.
        "noNewPrivs": sc.get("allowPrivilegeEscalation") is False,
        "maskedPaths": [] if privileged else MASKED_PATHS,
        "readonlyPaths": [] if privileged else READONLY_PATHS,
    }
    caps = sc.get("capabilities", {})
    if caps:
        out["capabilities"] = {
            "addCapabilities": [c for c in caps.get("add", []) if c not in lacking],
            "dropCapabilities": caps.get("drop", []),
        }
    if "runAsUser" in sc:
        out["runAsUser"] = {"value": sc["runAsUser"]}
    return out


def container_config(c, attempt, volumes, pod, lab, namespaces):
    unknown = set(c) - KNOWN_CONTAINER_KEYS
    if unknown:
        raise SystemExit(f"container {c['name']}: keys not translated: {sorted(unknown)}")
    env = envs(c, pod, lab.get("extra_env", {}).get(c["name"], {}))
    mounts = []
    for m in c.get("volumeMounts", []):
        host, forced_ro = volumes[m["name"]]
        if "subPath" in m:
            host = os.path.join(host, m["subPath"])
        mounts.append({
            "containerPath": m["mountPath"],
            "hostPath": host,
            "readonly": forced_ro or bool(m.get("readOnly", False)),
        })
    resources = {}
    limits, requests = c.get("resources", {}).get("limits", {}), c.get("resources", {}).get("requests", {})
    if "memory" in limits:
        resources["memoryLimitInBytes"] = quantity_bytes(limits["memory"])
    if "cpu" in requests:
        resources["cpuShares"] = max(2, milli_cpu(requests["cpu"]) * 1024 // 1000)
    return {
        "metadata": {"name": c["name"], "attempt": attempt},
        "image": {"image": c["image"]},
        "command": [expand(a, env) for a in c.get("command", [])],
        "args": [expand(a, env) for a in c.get("args", [])],
        "envs": [{"key": k, "value": v} for k, v in env.items()],
        "mounts": mounts,
        "logPath": f"{c['name']}/{attempt}.log",
        "linux": {
            "resources": resources,
            "securityContext": security_context(
                c.get("securityContext", {}), namespaces, lab.get("caps_not_in_bounding_set", [])
            ),
        },
    }


def resolv_conf():
    servers, searches, options = [], [], []
    with open("/etc/resolv.conf") as f:
        for line in f:
            words = line.split()
            if not words:
                continue
            if words[0] == "nameserver":
                servers += words[1:2]
            elif words[0] == "search":
                searches += words[1:]
            elif words[0] == "options":
                options += words[1:]
    return {"servers": servers, "searches": searches, "options": options}


def daemonset_pod(manifest, configmaps, lab):
    """The CRI configs of the DaemonSet's pod on the lab's node, with its probes.

    `lab`: host_ip, node_root (the node's file system as the runtime sees it), log_directory,
    configmap_dir (where the ConfigMaps' data is written, one directory per ConfigMap),
    extra_env (per container name: what only the lab adds, its OCI endpoints) and
    caps_not_in_bounding_set (capabilities the test machine's root cannot grant, left out
    of what is added: no runtime could grant them there)."""
    ds = find(load_all(manifest), "DaemonSet")
    for path in configmaps:
        for cm in load_all(path):
            if cm.get("kind") != "ConfigMap":
                continue
            d = os.path.join(lab["configmap_dir"], cm["metadata"]["name"])
            os.makedirs(d, exist_ok=True)
            for key, value in cm.get("data", {}).items():
                with open(os.path.join(d, key), "w") as f:
                    f.write(value)
    spec = ds["spec"]["template"]["spec"]
    namespace = ds["metadata"].get("namespace", "default")
    node = socket.gethostname()
    pod = {
        "name": f"{ds['metadata']['name']}-lab",
        "namespace": namespace,
        "node_name": node,
        "host_ip": lab["host_ip"],
    }
    host_network = spec.get("hostNetwork", False)
    namespaces = {"network": NODE if host_network else POD, "pid": CONTAINER, "ipc": POD}
    volumes = {
        v["name"]: host_path_of(v, lab["node_root"], lab["configmap_dir"])
        for v in spec.get("volumes", [])
    }
    # Default, or ClusterFirst on a hostNetwork pod (kubelet falls back to Default there):
    # the node's resolver. ClusterFirstWithHostNet would need the cluster's DNS, which cannot
    # run before this pod gives it an address.
    policy = spec.get("dnsPolicy", "ClusterFirst")
    if not (policy == "Default" or (policy == "ClusterFirst" and host_network)):
        raise SystemExit(f"dnsPolicy {policy}: only the node's resolver is translated")
    sandbox = {
        "metadata": {"name": pod["name"], "uid": pod["name"], "namespace": namespace, "attempt": 0},
        # kubelet names only pods of their own network: a hostNetwork pod shares the node's
        # UTS namespace and so its name.
        "hostname": "" if host_network else pod["name"],
        "logDirectory": lab["log_directory"],
        # dnsPolicy Default: the node's resolver, as kubelet reads it from its resolv.conf.
        "dnsConfig": resolv_conf(),
        "labels": dict(ds["spec"]["template"]["metadata"].get("labels", {})),
        "annotations": dict(ds["spec"]["template"]["metadata"].get("annotations", {})),
        "linux": {"securityContext": {"namespaceOptions": namespaces}},
    }
    build = lambda c: container_config(c, 0, volumes, pod, lab, namespaces)  # noqa: E731
    probes = {}
    for c in spec["containers"]:
        for kind in ("readinessProbe", "livenessProbe"):
            if kind in c:
                get = c[kind]["httpGet"]
                probes[f"{c['name']}/{kind}"] = {"path": get["path"], "port": get["port"]}
    return {
        "sandbox": sandbox,
        "init": [build(c) for c in spec.get("initContainers", [])],
        "containers": [build(c) for c in spec["containers"]],
        "probes": probes,
    }
