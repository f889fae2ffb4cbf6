"""Filters of role gateway: turn the instance plans of the backend hosts into nginx upstream servers.

Every decision about the upstream (address, max_conns, weight, backup, down) is made here, once, so the
template only renders the list. The functions are plain and unit-tested in tests/unit/gateway/.
"""

import hashlib
import importlib.util
import ipaddress
import os
import re
import sys

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # pragma: no cover - lets the unit tests run without ansible installed

    class AnsibleFilterError(Exception):
        pass


# Characters a key may hold: they go verbatim into an nginx map string and an HTTP header.
KEY_RE = re.compile(r"^[A-Za-z0-9._~+/=-]{16,256}$")
KEY_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DURATION_RE = re.compile(r"^[0-9]+(ms|s|m|h|d)?$")


def _get(mapping, key, default=None):
    try:
        value = mapping.get(key, default)
    except AttributeError:
        return default
    return default if value is None else value


def _host_vars(hostvars, host):
    """The vars of one inventory host, {} for a name the inventory does not hold (Ansible's hostvars does not
    raise KeyError for it)."""
    try:
        if host not in hostvars:
            return {}
        return hostvars[host]
    except Exception:  # noqa: BLE001 - any lookup failure means: no vars for this host
        return {}


def _load_names():
    """plugins/module_utils/ollama_names.py, the one home of the model name rule, loaded from the file (as
    plugins/filter/ollama_plan.py does: Ansible puts module_utils on the path of modules only): found from this
    file's real place (roles/gateway/filter_plugins/, or plugins/filter/ which links here) in a checkout or the
    installed collection, else through the collection (a copy of the role alone, as the benchmark renders it)."""
    loaded = sys.modules.get("herd_gateway_ollama_names")
    if loaded is not None:
        return loaded
    here = os.path.dirname(os.path.realpath(__file__))
    for path in (os.path.join(here, "..", "..", "..", "plugins", "module_utils", "ollama_names.py"),
                 os.path.join(here, "..", "module_utils", "ollama_names.py")):
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location("herd_gateway_ollama_names", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules["herd_gateway_ollama_names"] = module
            return module
    from ansible_collections.herd.herd.plugins.module_utils import ollama_names as module  # noqa: PLC0415

    return module


ollama_names = _load_names()


def gateway_model_key(name):
    """The pool a model name belongs to: Ollama's name rule (plugins/module_utils/ollama_names.py, the one source),
    shortest form (`x:latest`, `ns/x:tag`, `host:port/ns/x:tag`) in lower case, as Ollama compares names without
    regard to case; None for a name Ollama would refuse (bad characters, a part too long, more than
    ollama_names.MAX_NAME_BYTES bytes).

    The gateway's Lua port (files/herd_gateway/names.lua) is tested against cases generated from this function
    (tests/unit/gateway/test_names.py).
    """
    try:
        return ollama_names.short_name(name).lower()
    except ValueError:
        return None


# The reference model of the Lua's pools and per-instance limits (herd_gateway/settings.lua, slots.lua): not filters,
# no task uses them; tests/unit/gateway/test_routing.py checks the Lua running in nginx against them.
def gateway_pools(servers):
    """Model pools of the gateway: {model key: [server keys holding it]}, in server order."""
    pools = {}
    for server in servers or []:
        for model in server.get("models") or []:
            key = gateway_model_key(model)
            if key is None:
                continue
            members = pools.setdefault(key, [])
            if server["key"] not in members:
                members.append(server["key"])
    return pools


def gateway_instance_limits(servers, pools=None):
    """Slots of each instance over all its pools: {server key: max_conns}. An instance that holds several
    models has one limit for all of them (the gateway counts its in-flight requests once, whatever the model)."""
    pools = gateway_pools(servers) if pools is None else pools
    members = {key for keys in pools.values() for key in keys}
    return {s["key"]: int(s["max_conns"]) for s in servers or [] if s["key"] in members}


# Ollama's options (api/types.go): per-request sampling and load-time (Runner) ones.
OLLAMA_OPTIONS = (
    "num_keep", "seed", "num_predict", "top_k", "top_p", "min_p", "typical_p", "repeat_last_n", "temperature",
    "repeat_penalty", "presence_penalty", "frequency_penalty", "stop",
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread", "draft_num_predict",
)


def _duration_seconds(value):
    """Seconds of an nginx time that DURATION_RE accepts (no unit = seconds)."""
    number, unit = re.match(r"^([0-9]+)([a-z]*)$", str(value)).groups()
    return int(number) * {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def gateway_routing_errors(backend_hosts, hostvars, model_options=None, queue_max=64, queue_timeout="120s",
                           client_options=None, batch_aging="30s"):
    """Messages for bad routing settings, each naming the variable and the fix. Models are those the instance
    plans (hostvars[h].ollama_instances[*].models) of the backend hosts hold; hosts without a plan in this run
    are not checked against."""
    errors = []
    try:
        if int(queue_max) < 0:
            raise ValueError
    except (TypeError, ValueError):
        errors.append(f"gateway_queue_max={queue_max!r} must be a whole number, 0 or more. Fix: e.g. 64 (0 = no queue)")
    if not DURATION_RE.match(str(queue_timeout)):
        errors.append(f"gateway_queue_timeout={queue_timeout!r} is not an nginx time such as 600s, 10m or 500ms")
    if not DURATION_RE.match(str(batch_aging)):
        errors.append(f"gateway_batch_aging={batch_aging!r} is not an nginx time such as 30s or 2m")
    elif DURATION_RE.match(str(queue_timeout)) and _duration_seconds(batch_aging) >= _duration_seconds(queue_timeout):
        errors.append(f"gateway_batch_aging={batch_aging} is not below gateway_queue_timeout={queue_timeout}: a batch "
                      "request would time out before it may compete with interactive ones. Fix: e.g. 30s")
    client_options = {} if client_options is None else client_options
    if not isinstance(client_options, dict):
        errors.append("gateway_client_options must be a mapping of model name (or '*') to a list of option names. "
                      "Fix: e.g. {'qwen2.5:7b': ['num_ctx']}")
        client_options = {}
    for model, names in client_options.items():
        if model != "*" and gateway_model_key(model) is None:
            errors.append(f"gateway_client_options: {model!r} is not a model name. Fix: write NAME:TAG or '*'")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            errors.append(f"gateway_client_options[{model!r}] must be a list of Ollama option names, e.g. [num_ctx]")
            continue
        unknown = [n for n in names if n not in OLLAMA_OPTIONS]
        if unknown:
            errors.append(f"gateway_client_options[{model!r}]: {', '.join(map(repr, unknown))} not an Ollama option. "
                          f"Fix: use names of {', '.join(OLLAMA_OPTIONS)}")
    if not isinstance(model_options, dict):
        errors.append("gateway_model_options must be a mapping of model name to options. Fix: e.g. "
                      "{'qwen2.5:7b': {'num_ctx': 8192}}")
        return errors
    planned = set()
    any_plan = False
    for host in backend_hosts or []:
        plan = _get(_host_vars(hostvars, host), "ollama_instances")
        if plan is None:
            continue
        any_plan = True
        for inst in plan:
            for model in _get(inst, "models", []) or []:
                key = gateway_model_key(model)
                if key:
                    planned.add(key)
    for model, options in model_options.items():
        key = gateway_model_key(model)
        if key is None:
            errors.append(f"gateway_model_options: {model!r} is not a model name. Fix: write NAME:TAG, e.g. qwen2.5:7b")
        elif any_plan and key not in planned:
            errors.append(
                f"gateway_model_options: model {model!r} is held by no instance of gateway_backend_hosts (planned: "
                f"{', '.join(sorted(planned)) or 'none'}). Fix: name a model of ollama_models or remove the entry"
            )
        if not isinstance(options, dict):
            errors.append(f"gateway_model_options[{model!r}] must be a mapping of Ollama options, e.g. {{num_ctx: 8192}}")
    return errors


def _server_key(host, instance_id):
    return f"{host}:{instance_id}"


def _split_endpoint(endpoint):
    """`host:port` or `[v6]:port` (a URL's scheme and path are dropped) -> (address without brackets, port)."""
    text = str(endpoint or "").split("://", 1)[-1].split("/", 1)[0]
    address, _, port = text.rpartition(":")
    return address.strip("[]"), port


def _plan_servers(backend_hosts, hostvars, gateway_host, queue_per_instance=2, max_fails=1, fail_timeout="10s",
                  weights=None, backups=None, weight_by_parallel=True, previous=None):
    """(servers, errors): the upstream servers of every instance of every backend host, read from each host's
    published plan `ollama_instances` (role ollama, docs/architecture.md), and every problem found, each
    naming the variable and the fix. The gateway on an instance's own host dials the entry's `local_url`;
    a gateway on another host dials its `endpoint`."""
    weights = dict(weights or {})
    backups = list(backups or [])
    previous = list(previous or [])
    errors = []
    try:
        queue_per_instance = int(queue_per_instance)
    except (TypeError, ValueError):
        queue_per_instance = -1
    if queue_per_instance < 0:
        errors.append(f"gateway_queue_per_instance={queue_per_instance!r} must be 0 or more. Fix: e.g. 2")
        queue_per_instance = 0
    servers = []
    missing = []
    for host in backend_hosts or []:
        plan = _get(_host_vars(hostvars, host), "ollama_instances")
        if plan is None:
            kept = [dict(s) for s in previous if s.get("host") == host]
            if not kept:
                missing.append(host)
            servers.extend(kept)
            continue
        for inst in plan:
            try:
                instance_id = int(inst["id"])
                port = int(inst["port"])
                num_parallel = int(inst.get("num_parallel") or 1)
                local_address, _ = _split_endpoint(inst["local_url"])
                remote_address, _ = _split_endpoint(inst["endpoint"])
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                errors.append(f"instance plan (ollama_instances) of {host} has a bad entry {inst!r}: {exc}. Fix: let "
                              "role ollama compute it (do not set ollama_instances in the inventory by hand)")
                continue
            if not isinstance(inst.get("models") or [], list):
                errors.append(f"instance plan (ollama_instances) of {host} has a bad models list {inst.get('models')!r}")
                continue
            key = _server_key(host, instance_id)
            if host != gateway_host and inst.get("loopback_only"):
                errors.append(
                    f"instance {instance_id} of {host} listens on {inst.get('bind_address')} only, so gateway "
                    f"{gateway_host} cannot reach it. Fix: set ollama_bind_address of {host} to 0.0.0.0 or to the "
                    "address in ollama_advertise_address"
                )
                continue
            try:
                if key in weights:
                    weight = int(weights[key])
                elif host in weights:
                    weight = int(weights[host])
                elif weight_by_parallel:
                    weight = max(1, num_parallel)
                else:
                    weight = 1
            except (TypeError, ValueError):
                weight = 0
            if weight < 1:
                errors.append(f"gateway_weights: weight of {key} must be a whole number, 1 or more (got "
                              f"{weights.get(key, weights.get(host))!r}). Fix: e.g. 1, or remove the entry")
                weight = 1
            address = local_address if host == gateway_host else remote_address
            servers.append(
                {
                    "key": key,
                    "host": host,
                    "id": instance_id,
                    "name": str(inst.get("name") or f"ollama-{instance_id}"),
                    "address": address,
                    "port": port,
                    "endpoint": "{}:{}".format(f"[{address}]" if ":" in address else address, port),
                    "num_parallel": num_parallel,
                    "max_conns": num_parallel + queue_per_instance,
                    "max_fails": int(max_fails),
                    "fail_timeout": str(fail_timeout),
                    "weight": weight,
                    "backup": key in backups or host in backups,
                    "models": [m for m in (gateway_model_key(m) for m in inst.get("models") or []) if m],
                }
            )
    if missing:
        errors.append(
            "no instance plan for {}: run the play over these hosts too (role ollama publishes ollama_instances), "
            "or remove them from gateway_backend_hosts".format(", ".join(missing))
        )
    seen = {}
    for server in servers:
        endpoint = server["endpoint"]
        if endpoint in seen:
            errors.append(
                "instances {} and {} are both reached at {}. Fix: give the hosts distinct addresses "
                "(ollama_advertise_address) or list each host once in gateway_backend_hosts".format(
                    seen[endpoint], server["key"], endpoint)
            )
        seen.setdefault(endpoint, server["key"])
    return servers, errors


def gateway_servers(backend_hosts, hostvars, gateway_host, queue_per_instance=2, max_fails=1, fail_timeout="10s",
                    weights=None, backups=None, weight_by_parallel=True, previous=None):
    """Return the upstream servers of every instance of every backend host; raise on any problem
    (gateway_server_plan returns the servers and the same problems without raising, for the preflight play).

    A backend host without `ollama_instances` in this run (for example under `--limit`) keeps the servers it had
    at the last run (`previous`, read from the gateway host); a host never planned is an error.
    """
    servers, errors = _plan_servers(backend_hosts, hostvars, gateway_host, queue_per_instance, max_fails,
                                    fail_timeout, weights, backups, weight_by_parallel, previous)
    if errors:
        raise AnsibleFilterError("; ".join(errors))
    return servers


def gateway_server_plan(backend_hosts, hostvars, gateway_host, queue_per_instance=2, max_fails=1,
                        fail_timeout="10s", weights=None, backups=None, weight_by_parallel=True, previous=None):
    """One run for the role: {"servers": the upstream servers, "errors": every problem gateway_servers would raise
    (a loopback instance behind a remote gateway, two instances at one endpoint, a bad weight, a backend host
    without a plan, no server at all), as messages naming the variable and the fix}."""
    servers, errors = _plan_servers(backend_hosts, hostvars, gateway_host, queue_per_instance, max_fails,
                                    fail_timeout, weights, backups, weight_by_parallel, previous)
    if not servers and not errors:
        errors.append(f"the gateway has no upstream server: gateway_backend_hosts ({', '.join(backend_hosts or [])}) "
                      "hold no instance. Fix: add hosts to group ollama_hosts or set gateway_backend_hosts")
    return {"servers": servers, "errors": errors}


def gateway_server_errors(*args, **kwargs):
    """The errors of gateway_server_plan (Python callers)."""
    return gateway_server_plan(*args, **kwargs)["errors"]


def gateway_port_errors(instances, http_port=80, https_port=443, http_enabled=True, tls_enabled=False):
    """Messages for a gateway port that an instance of the plan on the same host (`instances`, this host's
    ollama_instances) already listens on; the gateway consumes the plan, so the check lives here."""
    errors = []
    ports = {}
    for inst in instances or []:
        try:
            ports[int(inst["port"])] = inst.get("id")
        except (KeyError, TypeError, ValueError):
            continue
    if not ports:
        return errors
    span = f"{min(ports)}-{max(ports)}"
    for variable, port, enabled in (("gateway_http_port", http_port, http_enabled),
                                    ("gateway_https_port", https_port, tls_enabled)):
        try:
            port = int(port)
        except (TypeError, ValueError):
            continue
        if enabled and port in ports:
            errors.append(
                f"{variable} {port} is the port of instance {ports[port]} on this host (ollama_base_port: instance "
                f"ports {span}). Fix: move ollama_base_port so that its ports avoid {port} (e.g. 11434), or move "
                f"{variable}"
            )
    return errors


def gateway_select(servers, targets):
    """Return the servers that drain targets ("host" or "host:instance_id") name; error on a target naming none."""
    chosen = []
    for target in targets or []:
        target = str(target).strip()
        if ":" in target:
            matches = [s for s in servers if s["key"] == target]
        else:
            matches = [s for s in servers if s["host"] == target]
        if not matches:
            raise AnsibleFilterError(
                "drain target {!r} names no gateway server; known: {}".format(target, ", ".join(s["key"] for s in servers) or "none")
            )
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def gateway_known_targets(targets, servers):
    """Keep the targets that still name a server (a drained host may have left the backends)."""
    known = []
    for target in targets or []:
        try:
            gateway_select(servers, [target])
        except AnsibleFilterError:
            continue
        if target not in known:
            known.append(target)
    return known


def gateway_mark_down(servers, targets):
    """Return a copy of the servers with `down: true` on those the targets name."""
    down_keys = {s["key"] for s in gateway_select(servers, targets)}
    result = []
    for server in servers:
        server = dict(server)
        server["down"] = server["key"] in down_keys
        result.append(server)
    return result


def gateway_cidr_errors(cidrs, variable="gateway_allow"):
    """Return one message per entry of a CIDR list (gateway_allow, gateway_real_ip_from) that is not an
    IPv4/IPv6 address or network; each names the variable and the fix."""
    errors = []
    if not cidrs:
        if variable == "gateway_allow":
            return ["gateway_allow is empty: every client would be refused. Fix: list the client networks in CIDR "
                    "form, e.g. [10.0.0.0/16]"]
        return []
    for entry in cidrs:
        try:
            ipaddress.ip_network(str(entry), strict=True)
        except ValueError as exc:
            errors.append(
                f"{variable} entry {entry!r} is not a valid network ({exc}). Fix: write an address or a network in "
                "CIDR form with the host bits zero, e.g. 10.0.0.0/16 or 192.0.2.7/32"
            )
    return errors


KEY_DIGEST_PREFIX = "herd-gateway-key:"
KEY_MIN_DISTINCT = 10


def gateway_key_digest(key):
    """The digest the gateway's Lua compares a presented key by (sha1 of KEY_DIGEST_PREFIX + key, hex)."""
    return hashlib.sha1((KEY_DIGEST_PREFIX + str(key)).encode("utf-8")).hexdigest()


def gateway_api_keys(keys, min_length=32, token_accounting=True):
    """Normalise gateway_api_keys (strings or {name, key}) to a list of {name, key, digest}; errors raise.

    A key must be min_length (gateway_api_key_min_length) to 256 characters of A-Z a-z 0-9 . _ ~ + / = - with at
    least KEY_MIN_DISTINCT distinct characters (refuses "aaaa..." and short repeats). The key itself is never
    echoed in a message."""
    result = []
    names = set()
    try:
        min_length = int(min_length)
    except (TypeError, ValueError):
        raise AnsibleFilterError(f"gateway_api_key_min_length={min_length!r} must be a whole number, e.g. 32") from None
    if min_length < 16:
        raise AnsibleFilterError(f"gateway_api_key_min_length={min_length} is below 16. Fix: 32 or more "
                                 "(e.g. `openssl rand -base64 32`)")
    for index, entry in enumerate(keys or []):
        if isinstance(entry, str):
            name, key = f"key{index}", entry
        else:
            name, key = str(_get(entry, "name", f"key{index}")), _get(entry, "key", "")
        key = str(key)
        if not KEY_NAME_RE.match(name):
            raise AnsibleFilterError(f"gateway_api_keys: name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        limits = _key_limits(name, {} if isinstance(entry, str) else entry)
        if limits["tokens_per_minute"] and not token_accounting:
            raise AnsibleFilterError(f"gateway_api_keys: tokens_per_minute of {name!r} needs the gateway's token "
                                     "accounting. Fix: set gateway_token_accounting: true, or drop tokens_per_minute")
        if not KEY_RE.match(key) or len(key) < min_length:
            raise AnsibleFilterError(
                f"gateway_api_keys: key of {name!r} must be {min_length}-256 characters of A-Z a-z 0-9 . _ ~ + / = - "
                "(gateway_api_key_min_length). Fix: generate one with `openssl rand -base64 32`"
            )
        if len(set(key)) < KEY_MIN_DISTINCT:
            raise AnsibleFilterError(
                f"gateway_api_keys: key of {name!r} has fewer than {KEY_MIN_DISTINCT} distinct characters: too easy "
                "to guess. Fix: generate one with `openssl rand -base64 32`"
            )
        if name in names:
            raise AnsibleFilterError(f"gateway_api_keys: name {name!r} is used twice")
        names.add(name)
        result.append({"name": name, "key": key, "digest": gateway_key_digest(key), "limits": limits})
    return result


KEY_FIELDS = ("name", "key", "models", "max_requests", "tokens_per_minute", "weight", "priority")
KEY_PRIORITIES = ("interactive", "batch")
# A key's weight: its share of a full pool against the other keys waiting there.
KEY_WEIGHT_MAX = 1000


def _key_limits(name, entry):
    """The limits of one gateway_api_keys entry: {models: [pool keys] (only when the entry names models),
    max_requests, tokens_per_minute (0 = no limit), weight (1 by default), priority (interactive by default)};
    errors name the key's name and the field, never the key."""
    try:
        fields = list(entry.keys())
    except AttributeError:
        raise AnsibleFilterError(f"gateway_api_keys: entry {name!r} must be a string or a {{name, key}} mapping") from None
    unknown = sorted(str(f) for f in fields if f not in KEY_FIELDS)
    if unknown:
        raise AnsibleFilterError(f"gateway_api_keys: entry {name!r} has unknown fields {unknown}. Fix: use only "
                                 f"{', '.join(KEY_FIELDS)}")
    limits = {}
    for field in ("max_requests", "tokens_per_minute"):
        value = _get(entry, field, 0)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise AnsibleFilterError(f"gateway_api_keys: {field} of {name!r} must be a whole number of 0 or more "
                                     f"(0 = no limit), got {value!r}")
        limits[field] = value
    weight = _get(entry, "weight", 1)
    if isinstance(weight, str) and weight.isdigit():
        weight = int(weight)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= KEY_WEIGHT_MAX:
        raise AnsibleFilterError(f"gateway_api_keys: weight of {name!r} must be a whole number from 1 to "
                                 f"{KEY_WEIGHT_MAX} (its share of a full pool against the other keys), got {weight!r}")
    limits["weight"] = weight
    priority = _get(entry, "priority", "interactive")
    if priority not in KEY_PRIORITIES:
        raise AnsibleFilterError(f"gateway_api_keys: priority of {name!r} must be one of {', '.join(KEY_PRIORITIES)}, "
                                 f"got {str(priority)[:40]!r}")
    limits["priority"] = priority
    models = _get(entry, "models")
    if models is not None:
        if isinstance(models, str) or not isinstance(models, (list, tuple)) or not models:
            raise AnsibleFilterError(f"gateway_api_keys: models of {name!r} must be a non-empty list of model names "
                                     "(leave it out to allow every model)")
        pools = []
        for model in models:
            pool = gateway_model_key(str(model))
            if pool is None:
                raise AnsibleFilterError(f"gateway_api_keys: models of {name!r} holds {str(model)[:80]!r}, which is "
                                         "not a model name Ollama accepts. Fix: e.g. llama3.2:3b")
            if pool not in pools:
                pools.append(pool)
        limits["models"] = pools
    return limits


SIZE_RE = re.compile(r"^[1-9][0-9]*[kKmM]?$")


def gateway_size_errors(values):
    """Messages for body limits (dict name -> value) that are not a positive nginx size (0 would mean no limit)."""
    return [
        f"{name}={value!r} is not a positive nginx size. Fix: e.g. 16m or 64k (0 would lift the limit)"
        for name, value in sorted((values or {}).items())
        if not SIZE_RE.match(str(value))
    ]


def gateway_duration_errors(values):
    """Return messages for values (dict name -> value) that are not nginx durations such as 600s or 10."""
    return [
        f"{name}={value!r} is not an nginx time such as 600s, 10m or 500ms"
        for name, value in sorted((values or {}).items())
        if not DURATION_RE.match(str(value))
    ]


class FilterModule:
    def filters(self):
        return {
            "gateway_servers": gateway_servers,
            "gateway_server_plan": gateway_server_plan,
            "gateway_port_errors": gateway_port_errors,
            "gateway_select": gateway_select,
            "gateway_mark_down": gateway_mark_down,
            "gateway_known_targets": gateway_known_targets,
            "gateway_cidr_errors": gateway_cidr_errors,
            "gateway_api_keys": gateway_api_keys,
            "gateway_duration_errors": gateway_duration_errors,
            "gateway_size_errors": gateway_size_errors,
            "gateway_key_digest": gateway_key_digest,
            "gateway_model_key": gateway_model_key,
            "gateway_routing_errors": gateway_routing_errors,
        }
