#!/usr/bin/env python3
"""Semantic checks of the deployment files, beyond their schemas (run by .ci/check-deploy).

The schemas say a file is well-formed; this says it fits amqp-mailer: configuration keys that
exist (README's table), stop timeouts longer than the drain grace, probes on the right endpoints,
references that resolve, a hardened container. With --bin it also has the binary load each
configuration (the example, the compose environment, the Kubernetes ConfigMap and Secret).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

import dockerfile

ROOT = Path(__file__).resolve().parent.parent
HTTP_PORT = 9464
errors = []


def check(ok, message):
    if not ok:
        errors.append(message)
    return ok


def seconds(text):
    """'35s', '1m30s', '500ms', 35 (systemd/compose/k8s style) -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    text = str(text).strip()
    if re.fullmatch(r"\d+", text):
        return float(text)
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|sec|min|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def readme_keys():
    """section.key for every row of README's configuration table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration", 1)[-1].split("\n## ", 1)[0]
    keys = set(re.findall(r"^\| `([a-z_0-9]+(?:\.[a-z_0-9]+)+)` \|", section, re.M))
    if not keys:
        sys.exit("check_deploy: found no configuration table in README.md ('## Configuration')")
    return keys


def toml_keys(text, commented_too=False):
    """section.key of a two-level TOML text; with commented_too also '# key = ...' lines."""
    keys = {f"{s}.{k}" for s, table in tomllib.loads(text).items() for k in table}
    if commented_too:
        section = None
        for line in text.splitlines():
            # A table, or a table or array of tables shown commented out (`# [smtp.oauth2]`,
            # `# [[dkim]]`).
            if m := re.match(r"^\[([a-z_0-9.]+)\]", line) or re.match(
                r"^#\s?\[\[?([a-z_0-9.]+)\]\]?\s*$", line
            ):
                section = m.group(1)
            elif section and (m := re.match(r"^#\s?([a-z_]+) = ", line)):
                keys.add(f"{section}.{m.group(1)}")
    return keys


def env_key(name):
    """AMQP_MAILER_SMTP__PORT -> smtp.port (None for other variables)."""
    m = re.fullmatch(r"AMQP_MAILER_([A-Z]+)__([A-Z_]+)", name)
    return f"{m.group(1).lower()}.{m.group(2).lower()}" if m else None


def run_binary(binary, args, env, what):
    """Runs `amqp-mailer ARGS config` with only ENV as configuration; returns stdout or None."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AMQP_MAILER_")}
    clean.update(env)
    proc = subprocess.run([binary, *args, "config"], env=clean, capture_output=True, text=True)
    if not check(proc.returncode == 0,
                 f"{what}: `amqp-mailer config` exited {proc.returncode}: {proc.stderr.strip()}"):
        return None
    return proc.stdout


# --- config.example.toml -------------------------------------------------------------------

def check_example(keys, binary):
    path = ROOT / "deploy/config.example.toml"
    text = path.read_text()
    try:
        found = toml_keys(text, commented_too=True)
    except tomllib.TOMLDecodeError as e:
        return check(False, f"{path.name}: not TOML: {e}")
    check(not keys - found, f"{path.name}: keys of README's table missing: {sorted(keys - found)}")
    check(not found - keys, f"{path.name}: keys not in README's table: {sorted(found - keys)}")
    if binary:
        defaults = run_binary(binary, [], {}, "built-in defaults")
        example = run_binary(binary, ["--config", str(path)], {}, path.name)
        if defaults is not None and example is not None:
            check(defaults == example,
                  f"{path.name}: its values differ from the built-in defaults "
                  "(diff `amqp-mailer config` with and without --config)")


# --- docker-compose.yml --------------------------------------------------------------------

def healthcheck_test(service):
    test = (service.get("healthcheck") or {}).get("test")
    return test if isinstance(test, list) else [test] if test else []


def check_compose(keys, grace, binary):
    path = ROOT / "docker-compose.yml"
    doc = yaml.safe_load(path.read_text())
    services = doc.get("services") or {}
    for name in ("rabbitmq", "mailpit", "amqp-mailer"):
        check(name in services, f"{path.name}: no service {name}")
    for name, service in services.items():
        check("image" in service or "build" in service, f"{path.name}: {name}: neither image nor build")
        check(healthcheck_test(service), f"{path.name}: {name}: no healthcheck")
    mailer = services.get("amqp-mailer") or {}
    build = mailer.get("build") or {}
    if check(isinstance(build, dict) and build.get("dockerfile"), f"{path.name}: amqp-mailer: no build.dockerfile"):
        context = ROOT / build.get("context", ".")
        check((context / build["dockerfile"]).is_file(),
              f"{path.name}: amqp-mailer: {build['dockerfile']} not found in context {context}")
    depends = mailer.get("depends_on") or {}
    for name in ("rabbitmq", "mailpit"):
        check(isinstance(depends, dict) and (depends.get(name) or {}).get("condition") == "service_healthy",
              f"{path.name}: amqp-mailer: depends_on {name} without condition: service_healthy")
    check("health" in healthcheck_test(mailer), f"{path.name}: amqp-mailer: healthcheck is not `amqp-mailer health`")
    check(mailer.get("restart") == "unless-stopped", f"{path.name}: amqp-mailer: restart is not unless-stopped")
    stop = seconds(mailer.get("stop_grace_period", "10s"))
    check(stop > grace, f"{path.name}: amqp-mailer: stop_grace_period {stop:g}s is not longer than the {grace:g}s grace")
    env = mailer.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    env = {k: str(v) for k, v in env.items()}
    for name in env:
        key = env_key(name)
        check(key is None or key in keys, f"{path.name}: amqp-mailer: {name} names no configuration key")
    check(env.get("AMQP_MAILER_HTTP__LISTEN", "").endswith(f":{HTTP_PORT}"),
          f"{path.name}: amqp-mailer: AMQP_MAILER_HTTP__LISTEN is not on port {HTTP_PORT}")
    check("@rabbitmq:" in env.get("AMQP_MAILER_AMQP__URL", ""),
          f"{path.name}: amqp-mailer: AMQP_MAILER_AMQP__URL does not point at the rabbitmq service")
    check(env.get("AMQP_MAILER_SMTP__HOST") == "mailpit", f"{path.name}: amqp-mailer: smtp host is not mailpit")
    published = {str(p).split(":")[-2] if str(p).count(":") else str(p)
                 for s in services.values() for p in s.get("ports") or []}
    for port in ("15673", "8025"):
        check(port in published, f"{path.name}: port {port} is not published")
    # The README's "Run it" assumes the host's own RabbitMQ on 5672 (and a catcher may hold 1025).
    for port in ("5672", "15672", "1025"):
        check(port not in published, f"{path.name}: host port {port} is published; it clashes with a local broker or catcher")
    if binary:
        run_binary(binary, [], env, f"{path.name}: amqp-mailer's environment")


# --- Kubernetes ------------------------------------------------------------------------------

def pod_templates(doc):
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        return [spec]
    if kind == "CronJob":
        return [spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})]
    if "template" in spec:
        return [spec["template"].get("spec") or {}]
    return []


def check_kubernetes(keys, grace, binary):
    files = sorted((ROOT / "deploy/kubernetes").glob("*.y*ml"))
    check(files, "deploy/kubernetes: no YAML files")
    example_secret = ROOT / "deploy/kubernetes-secret.example.yaml"
    check(example_secret.is_file(), f"{example_secret.relative_to(ROOT)} is missing")
    docs = []
    for path in files + [example_secret]:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            where = f"{path.relative_to(ROOT)}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
            for field in ("apiVersion", "kind", "metadata"):
                check(field in doc, f"{where}: no {field}")
            docs.append((where, doc))
            # `kubectl apply -f deploy/kubernetes/` must never overwrite a real Secret.
            check(doc.get("kind") != "Secret" or path == example_secret,
                  f"{where}: a Secret under deploy/kubernetes/ would replace the real one on apply")
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for _, d in docs if d.get("kind") == "ConfigMap"}
    secrets = {d["metadata"]["name"]: {**(d.get("stringData") or {}), **(d.get("data") or {})}
               for _, d in docs if d.get("kind") == "Secret"}
    mailers = 0
    for where, doc in docs:
        for pod in pod_templates(doc):
            check_pod(where, pod, configmaps, secrets, keys, grace, binary)
            mailers += sum("amqp-mailer" in c.get("image", "") for c in pod.get("containers") or [])
    check(mailers, "deploy/kubernetes: no container runs the amqp-mailer image")


def check_pod(where, pod, configmaps, secrets, keys, grace, binary):
    pod_sc = pod.get("securityContext") or {}
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for name, volume in volumes.items():
        if "configMap" in volume:
            ref = volume["configMap"]
            for item in ref.get("items") or []:
                check(item["key"] in configmaps.get(ref["name"], {}),
                      f"{where}: volume {name}: ConfigMap {ref['name']} has no key {item['key']}")
        if "secret" in volume:
            ref = volume["secret"]
            for item in ref.get("items") or []:
                check(item["key"] in secrets.get(ref["secretName"], {}),
                      f"{where}: volume {name}: Secret {ref['secretName']} has no key {item['key']}")
    for c in pod.get("containers") or []:
        cw = f"{where}: container {c.get('name')}"
        sc = {**pod_sc, **(c.get("securityContext") or {})}
        check(sc.get("runAsNonRoot") is True, f"{cw}: runAsNonRoot is not true")
        check(sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation is not false")
        check(sc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem is not true")
        check("ALL" in ((sc.get("capabilities") or {}).get("drop") or []), f"{cw}: capabilities do not drop ALL")
        check((sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{cw}: no RuntimeDefault seccomp")
        resources = c.get("resources") or {}
        check((resources.get("requests") or {}).get("memory") and (resources.get("limits") or {}).get("memory"),
              f"{cw}: no memory request and limit")
        for mount in c.get("volumeMounts") or []:
            check(mount["name"] in volumes, f"{cw}: mounts undefined volume {mount['name']}")
        if "amqp-mailer" in c.get("image", ""):
            check_mailer(cw, pod, c, volumes, configmaps, secrets, keys, grace, binary)


def check_mailer(cw, pod, c, volumes, configmaps, secrets, keys, grace, binary):
    stop = pod.get("terminationGracePeriodSeconds", 30)
    check(stop > grace, f"{cw}: terminationGracePeriodSeconds {stop} is not longer than the {grace:g}s grace")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = (c.get(probe) or {}).get("httpGet") or {}
        port = ports.get(get.get("port"), get.get("port"))
        check(get.get("path") == path and port == HTTP_PORT, f"{cw}: {probe} is not GET {path} on port {HTTP_PORT}")
    args = c.get("args") or []
    config_file = args[args.index("--config") + 1] if "--config" in args[:-1] else None
    # Files the container sees, mapped to their content in this directory's ConfigMaps/Secrets.
    files = {}
    for mount in c.get("volumeMounts") or []:
        volume = volumes.get(mount["name"], {})
        if "configMap" in volume:
            source, ref = configmaps.get(volume["configMap"]["name"], {}), volume["configMap"]
        elif "secret" in volume:
            source, ref = secrets.get(volume["secret"]["secretName"], {}), volume["secret"]
        else:
            continue
        items = ref.get("items") or [{"key": k, "path": k} for k in source]
        for item in items:
            if item["key"] in source:
                files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = str(source[item["key"]])
    env = {}
    for var in c.get("env") or []:
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif ref := (var.get("valueFrom") or {}).get("secretKeyRef"):
            if check(ref["key"] in secrets.get(ref["name"], {}), f"{cw}: env {var['name']}: no Secret key {ref}"):
                env[var["name"]] = str(secrets[ref["name"]][ref["key"]])
        key = env_key(var["name"])
        check(key is None or key in keys, f"{cw}: env {var['name']} names no configuration key")
    if not check(config_file in files, f"{cw}: --config {config_file} is not a mounted ConfigMap key"):
        return
    try:
        config = tomllib.loads(files[config_file])
    except tomllib.TOMLDecodeError as e:
        return check(False, f"{cw}: {config_file}: not TOML: {e}")
    found = toml_keys(files[config_file])
    check(found <= keys, f"{cw}: {config_file}: unknown keys {sorted(found - keys)}")
    listen = env.get("AMQP_MAILER_HTTP__LISTEN") or config.get("http", {}).get("listen", "")
    check(listen == f"0.0.0.0:{HTTP_PORT}", f"{cw}: http.listen is {listen!r}, not 0.0.0.0:{HTTP_PORT} (probes)")
    for var, path in env.items():
        if var.endswith("_FILE"):
            check(path in files, f"{cw}: {var}={path} is not a mounted file")
    if binary:
        with tempfile.TemporaryDirectory() as tmp:
            # Lay the mounted files out under a temporary root and point the binary at them.
            moved = {path: str(Path(tmp) / path.lstrip("/")) for path in files}
            for path, content in files.items():
                Path(moved[path]).parent.mkdir(parents=True, exist_ok=True)
                Path(moved[path]).write_text(content)
            env = {k: moved.get(v, v) for k, v in env.items()}
            run_binary(binary, ["--config", moved[config_file]], env, f"{cw}: its configuration")


# --- Dockerfile and .dockerignore ------------------------------------------------------------

def check_dockerfile():
    path = ROOT / "deploy/Dockerfile"
    commands = dockerfile.parse_file(str(path))
    stages = [i for i, c in enumerate(commands) if c.cmd == "FROM"]
    check(len(stages) >= 2, f"{path.name}: not multi-stage")
    build = commands[: stages[-1]]
    final = {c.cmd: c for c in commands[stages[-1]:]}  # the last of each instruction
    check(any(c.cmd == "RUN" and "cargo build --release --locked" in c.original for c in build),
          f"{path.name}: no `cargo build --release --locked` in the build stage")
    user = final.get("USER")
    check(user and re.fullmatch(r"[1-9]\d*(:\d+)?", user.value[0]),
          f"{path.name}: the final stage has no numeric non-root USER")
    for cmd in ("HEALTHCHECK", "ENTRYPOINT", "CMD"):
        check(cmd in final and final[cmd].json, f"{path.name}: {cmd} is missing or not in exec (JSON) form")
    check("HEALTHCHECK" in final and final["HEALTHCHECK"].value[-1] == "health",
          f"{path.name}: HEALTHCHECK is not `amqp-mailer health`")
    check("CMD" in final and list(final["CMD"].value) == ["run"], f"{path.name}: CMD is not [\"run\"]")
    check("EXPOSE" in final and str(HTTP_PORT) in final["EXPOSE"].value, f"{path.name}: no EXPOSE {HTTP_PORT}")
    check("STOPSIGNAL" in final and final["STOPSIGNAL"].value[0] == "SIGTERM", f"{path.name}: STOPSIGNAL is not SIGTERM")
    envs = [c for c in commands[stages[-1]:] if c.cmd == "ENV"]
    check(any(f"AMQP_MAILER_HTTP__LISTEN=0.0.0.0:{HTTP_PORT}" in c.original for c in envs),
          f"{path.name}: no ENV AMQP_MAILER_HTTP__LISTEN=0.0.0.0:{HTTP_PORT}")
    ignore = (ROOT / ".dockerignore").read_text().splitlines() if (ROOT / ".dockerignore").is_file() else []
    ignored = {p.strip().strip("/") for p in ignore if p.strip() and not p.startswith("#")}
    check({"target", ".git"} <= ignored, ".dockerignore: does not exclude target/ and .git/")
    for c in commands:
        if c.cmd in ("COPY", "ADD") and not any(f.startswith("--from") for f in c.flags):
            for source in c.value[:-1]:
                check((ROOT / source).exists(), f"{path.name}: COPY source {source} not in the build context")
                check(source.strip("/") not in ignored, f"{path.name}: COPY source {source} is in .dockerignore")


# --- systemd unit ----------------------------------------------------------------------------

def check_unit(grace):
    path = ROOT / "deploy/amqp-mailer.service"
    settings = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    one = {k: v[-1] for k, v in settings.items()}
    check(one.get("Type") == "notify", f"{path.name}: Type is not notify")
    check(one.get("NotifyAccess") == "main", f"{path.name}: NotifyAccess is not main")
    check("WatchdogSec" in one and seconds(one["WatchdogSec"]) > 0, f"{path.name}: no WatchdogSec")
    check(one.get("Restart") == "on-failure", f"{path.name}: Restart is not on-failure")
    check("64" in " ".join(settings.get("RestartPreventExitStatus", [])).split(),
          f"{path.name}: RestartPreventExitStatus does not include 64 (bad configuration)")
    stop = seconds(one.get("TimeoutStopSec", "90s"))
    check(stop > grace, f"{path.name}: TimeoutStopSec {stop:g}s is not longer than the {grace:g}s grace")
    check(" run" in one.get("ExecStart", "") and "--config" in one.get("ExecStart", ""),
          f"{path.name}: ExecStart is not `amqp-mailer --config FILE run`")
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        check(settings.get(key) == [""], f"{path.name}: {key}= is not empty")
    # A first start with the example configuration (no smtp.username) must work: the password
    # credential is a drop-in, installed with AUTH only.
    check("LoadCredential" not in settings,
          f"{path.name}: LoadCredential= in the unit fails a start without the password file")
    dropin = ROOT / "deploy/amqp-mailer.service.d/smtp-password.conf"
    text = dropin.read_text() if dropin.is_file() else ""
    check("LoadCredential=smtp-password:" in text and "AMQP_MAILER_SMTP__PASSWORD_FILE=%d/smtp-password" in text,
          f"{dropin.relative_to(ROOT)}: no LoadCredential= and PASSWORD_FILE for the SMTP password")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", help="amqp-mailer binary: also load each configuration with it")
    args = parser.parse_args()
    keys = readme_keys()
    example = tomllib.loads((ROOT / "deploy/config.example.toml").read_text())
    grace = seconds(example.get("shutdown", {}).get("grace", "25s"))
    check_example(keys, args.bin)
    check_compose(keys, grace, args.bin)
    check_kubernetes(keys, grace, args.bin)
    check_dockerfile()
    check_unit(grace)
    for message in errors:
        print(f"FAIL {message}", file=sys.stderr)
    if errors:
        sys.exit(1)
    print(f"ok: {len(keys)} configuration keys; example, compose, Kubernetes, Dockerfile and unit fit them"
          + ("" if args.bin else " (no binary: configurations not loaded)"))


if __name__ == "__main__":
    main()
