"""Bad input: site.yml must stop in its preflight play, name the variable and the fix, and change nothing.

Each case runs the real `ansible-playbook site.yml` against the prepared lab host with one bad setting
(`-e @case.json`). A case passes when the run fails, the first failed task belongs to the preflight play, the
output names the variable and a fix, and a checksum snapshot of the host's /etc, /usr/local, /opt and
/var/lib/herd equals the snapshot taken before any case ran. Cases run three at a time (each is a few seconds
of preflight, the host's facts read from a cache after the first); a final test prints the counts.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule"))
from herd_measure import measured as _measured  # noqa: E402

testinfra_hosts = ["herd-mol-bad"]

PROJECT = os.environ["MOLECULE_PROJECT_DIRECTORY"]
INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
HOST = "herd-mol-bad"
PREFLIGHT_PLAY = "Validate settings and plan every host before any change"
SNAPSHOT = r"""
set -o pipefail
dirs=""; for d in /etc /usr/local /opt /var/lib/herd; do [ -e "$d" ] && dirs="$dirs $d"; done
find $dirs -xdev -printf '%p %y %m %u %g %s %l\n' | LC_ALL=C sort
find $dirs -xdev -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
"""
KEY_A = "herd-test-key-AAAAAAAAAAAAAAAA-0123456789"
# A case whose extra vars hold PEER adds a second GPU host, herd-mol-bad-peer, to the inventory (groups lab and
# ollama_hosts, not gateways), with those host vars: another inventory name for the same container, so the
# gateway herd-mol-bad sees it as a remote backend and the snapshot covers both hosts.
PEER = "herd_badinput_peer"
PEER_HOST = "herd-mol-bad-peer"

# (id, extra vars, substrings the output must contain: the variable, then words of the fix)
CASES = [
    ("unknown_gpu_index", {"ollama_gpu_groups": [[0], [7]]}, ["ollama_gpu_groups", "GPU 7 is not on this host", "Fix:"]),
    ("overlapping_gpu_groups", {"ollama_gpu_groups": [[0, 1], [1, 2]]},
     ["ollama_gpu_groups", "GPU 1 is", "Fix: put every GPU in at most one group"]),
    ("port_clash_store_instance", {"ollama_base_port": 11433},
     ["ollama_base_port", "ollama_store_port", "Fix: move ollama_base_port"]),
    ("port_clash_gateway", {"ollama_base_port": 78}, ["ollama_base_port", "gateway_http_port", "Fix: move ollama_base_port"]),
    ("gateway_port_on_instance", {"gateway_http_port": 11435},
     ["ollama_base_port", "gateway_http_port", "Fix: move ollama_base_port"]),
    ("ports_beyond_65535", {"ollama_base_port": 65534}, ["ollama_base_port", "beyond 65535", "Fix: set ollama_base_port to at most"]),
    ("non_cidr_allowlist_entry", {"gateway_allow": ["10.0.0.0/33"]}, ["gateway_allow", "'10.0.0.0/33'", "Fix:"]),
    ("allowlist_host_bits_set", {"gateway_allow": ["10.1.2.3/8"]}, ["gateway_allow", "'10.1.2.3/8'", "Fix:"]),
    ("empty_allowlist_denies_all", {"gateway_allow": []}, ["gateway_allow is empty", "list the client networks"]),
    ("trusted_proxy_not_cidr", {"gateway_real_ip_from": ["proxy.example"]}, ["gateway_real_ip_from", "Fix:"]),
    ("negative_keep_alive_string", {"ollama_keep_alive": "-1 minute"},
     ["ollama_keep_alive", "'-1 minute' is not a duration", 'Fix: use a duration such as "5m"']),
    ("keep_alive_override_bad", {"ollama_instance_overrides": {"1": {"keep_alive": "forever"}}},
     ["ollama_instance_overrides[1].keep_alive", "Fix: use a duration"]),
    ("model_not_fitting", {"ollama_gpu_groups": [[0], [1]], "ollama_models": [{"name": "herd-big:70b", "vram_gib": 80}]},
     ["ollama_models", "herd-big:70b needs about", "Fix: give it a bigger group"]),
    ("duplicate_model", {"ollama_models": ["herd-tiny:1b", "herd-tiny:1b"]},
     ["ollama_models[1]", "listed twice", "Fix: list each model once"]),
    ("model_unknown_key", {"ollama_models": [{"name": "herd-tiny:1b", "vram": 2}]},
     ["ollama_models[0]", "unknown key(s) vram", "Fix: use only"]),
    ("missing_archive_checksum", {"ollama_archive_local": ""},
     ["ollama_archive_checksum must be", "or set ollama_archive_local"]),
    ("malformed_archive_checksum", {"ollama_archive_local": "", "ollama_archive_checksum": "md5:0123"},
     ["ollama_archive_checksum must be", "sha256:<64 hex>"]),
    ("archive_local_missing", {"ollama_archive_local": "/nonexistent/ollama-linux-amd64.tgz"},
     ["ollama_archive_local", "is not a file on the", "Fix:"]),
    ("tls_cert_without_key", {"gateway_tls_enabled": True, "gateway_tls_cert": "/etc/ssl/certs/herd.pem"},
     ["gateway_tls_key", "give both gateway_tls_cert and gateway_tls_key or neither"]),
    ("http_https_same_port", {"gateway_tls_enabled": True, "gateway_https_port": 80},
     ["gateway_http_enabled / gateway_tls_enabled", "distinct ports"]),
    ("duplicate_api_key_names", {"gateway_api_keys": [{"name": "team-a", "key": KEY_A}, {"name": "team-a", "key": KEY_A + "B"}]},
     ["gateway_api_keys", "'team-a' is used twice"]),
    ("api_key_too_short", {"gateway_api_keys": ["herd-short"]}, ["gateway_api_keys", "32-256 characters",
                                                                  "gateway_api_key_min_length"]),
    ("api_key_too_weak", {"gateway_api_keys": ["ab" * 20]}, ["gateway_api_keys", "fewer than 10 distinct", "Fix:"]),
    ("api_key_unknown_limit", {"gateway_api_keys": [{"name": "team-a", "key": KEY_A, "max_request": 2}]},
     ["gateway_api_keys", "'team-a' has unknown fields ['max_request']", "Fix:"]),
    ("api_key_bad_models", {"gateway_api_keys": [{"name": "team-a", "key": KEY_A, "models": ["bad model!"],
                                                  "tokens_per_minute": 1000}]},
     ["gateway_api_keys", "models of 'team-a'", "not a model name Ollama accepts"]),
    ("api_key_bad_weight", {"gateway_api_keys": [{"name": "team-a", "key": KEY_A, "weight": 0}]},
     ["gateway_api_keys", "weight of 'team-a' must be a whole number from 1 to 1000"]),
    ("api_key_tokens_without_accounting", {"gateway_api_keys": [{"name": "team-a", "key": KEY_A, "tokens_per_minute": 9}],
                                           "gateway_token_accounting": False},
     ["tokens_per_minute of 'team-a' needs the gateway's token accounting", "Fix: set gateway_token_accounting: true"]),
    ("batch_aging_not_below_queue_timeout", {"gateway_batch_aging": "5m"},
     ["gateway_batch_aging=5m is not below gateway_queue_timeout=120s", "Fix:"]),
    ("api_key_min_length_low", {"gateway_api_keys": [KEY_A], "gateway_api_key_min_length": 8},
     ["gateway_api_key_min_length=8 is below 16", "Fix:"]),
    ("body_limit_zero", {"gateway_body_max_inference": "0"},
     ["gateway_body_max_inference=", "is not a positive nginx size", "Fix:"]),
    ("body_limit_above_inference", {"gateway_body_max_embedding": "32m"},
     ["gateway_body_max_embedding", "gateway_body_max_inference", "Fix:"]),
    ("body_memory_below_inference", {"gateway_body_memory": "8m"},
     ["must not exceed gateway_body_memory (8m)", "Fix:"]),
    ("client_option_unknown", {"gateway_client_options": {"*": ["num_ctxx"]}},
     ["gateway_client_options[", "num_ctxx", "not an Ollama option", "Fix:"]),
    ("limit_conn_negative", {"gateway_limit_conn": -1}, ["gateway_limit_conn", "0 or more"]),
    ("unknown_mode", {"ollama_mode": "kubernetes"}, ["ollama_mode", "systemd"]),
    ("container_bad_volume", {"ollama_mode": "container", "ollama_container_volumes": ["relative:/x"]},
     ["ollama_container_volumes entries must be", "relative:/x"]),
    ("unknown_copy_method", {"ollama_copy_method": "symlink"}, ["ollama_copy_method must be one of: copy, hardlink, reflink"]),
    ("registry_with_scheme", {"ollama_registry": "http://mirror.local:5000"},
     ["ollama_registry must be a registry host[:port] only, without a scheme or a path", "Fix:",
      "ollama_pull_insecure: true"]),
    ("registry_bad_port", {"ollama_registry": "mirror.local:99999"}, ["ollama_registry has a bad port", "Fix:"]),
    ("path_source_without_bundle", {"ollama_model_source": "path"},
     ["ollama_model_bundle_path must name the bundle directory"]),
    ("override_unknown_instance", {"ollama_instance_overrides": {"9": {"num_parallel": 2}}},
     ["ollama_instance_overrides[9]", "instance 9 does not exist", "Fix:"]),
    ("override_unknown_setting", {"ollama_instance_overrides": {"0": {"gpus": [1]}}},
     ["ollama_instance_overrides[0].gpus", "is not a per-instance setting", "Fix: use only"]),
    ("num_parallel_zero", {"ollama_num_parallel": 0}, ["ollama_num_parallel", "out of range", "Fix: use a whole number"]),
    ("max_queue_not_a_number", {"ollama_max_queue": "lots"}, ["'ollama_max_queue' is of type str", "cannot be converted to an int"]),
    ("headroom_over_100", {"ollama_vram_headroom_pct": 150}, ["ollama_vram_headroom_pct", "Fix: use a percentage"]),
    ("unknown_kv_cache_type", {"ollama_kv_cache_type": "q2_k"}, ["ollama_kv_cache_type must be one of: , f16, q8_0, q4_0"]),
    ("bad_bind_address", {"ollama_bind_address": "not an address"}, ["ollama_bind_address", "Fix:"]),
    ("relative_data_dir", {"ollama_data_dir": "var/lib/herd"}, ["ollama_data_dir", "Fix:"]),
    # Folders that are not herd's own: install prunes and teardown removes there, the sync hands them to ollama.
    ("install_dir_opt", {"ollama_install_dir": "/opt"},
     ["ollama_install_dir", "'/opt' is a system folder", "Fix: use a folder of herd's own"]),
    ("install_dir_usr_local", {"ollama_install_dir": "/usr/local/"},
     ["ollama_install_dir", "'/usr/local/' is a system folder", "Fix: use a folder of herd's own"]),
    ("data_dir_root", {"ollama_data_dir": "/"}, ["ollama_data_dir", "'/' is a system folder", "Fix:"]),
    ("data_dir_var_lib", {"ollama_data_dir": "/var/lib"}, ["ollama_data_dir", "'/var/lib' is a system folder", "Fix:"]),
    ("data_dir_etc", {"ollama_data_dir": "/etc"}, ["ollama_data_dir", "'/etc' is a system folder", "Fix:"]),
    ("install_dir_a_home", {"ollama_install_dir": "/home/admin"}, ["ollama_install_dir", "a user's home", "Fix:"]),
    ("data_dir_holds_install_dir", {"ollama_data_dir": "/srv/herd", "ollama_install_dir": "/srv/herd/ollama"},
     ["ollama_data_dir", "holds ollama_install_dir", "Fix: put them side by side"]),
    ("install_and_data_dir_one_folder", {"ollama_data_dir": "/srv/herd", "ollama_install_dir": "/srv/herd"},
     ["ollama_install_dir and ollama_data_dir: both are '/srv/herd'", "Fix: give each its own folder"]),
    ("data_dir_over_herd_settings", {"ollama_data_dir": "/etc/herd"},
     ["ollama_data_dir", "overlaps /etc/herd/ollama", "Fix:"]),
    ("extra_env_sets_herd_variable", {"ollama_extra_env": {"OLLAMA_HOST": "0.0.0.0:1"}},
     ["ollama_extra_env", "OLLAMA_HOST is set by herd itself", "Fix:"]),
    ("bad_load_timeout", {"ollama_load_timeout": "soon"}, ["ollama_load_timeout", "Fix:"]),
    ("bad_gateway_timeout", {"gateway_read_timeout": "10 minutes"}, ["gateway_read_timeout", "600s, 10m or 500ms"]),
    ("next_upstream_tries_zero", {"gateway_next_upstream_tries": 0}, ["gateway_next_upstream_tries", "1 or more"]),
    ("busy_status_not_allowed", {"gateway_busy_status": 500}, ["gateway_busy_status", "503"]),
    ("model_options_unknown_model", {"gateway_model_options": {"llama9:70b": {"num_ctx": 8192}}},
     ["gateway_model_options", "'llama9:70b' is held by no instance", "Fix:"]),
    # The argument spec (validated in preflight) answers these two before the routing check.
    ("model_options_not_a_mapping", {"gateway_model_options": ["num_ctx"]},
     ["'gateway_model_options' is of type list", "unable to convert to dict"]),
    ("client_keep_alive_unknown", {"gateway_client_keep_alive": "never"},
     ["value of gateway_client_keep_alive must be one of: ignore, pass, got: never"]),
    ("queue_max_negative", {"gateway_queue_max": -1}, ["gateway_queue_max", "0 or more"]),
    ("queue_timeout_not_a_time", {"gateway_queue_timeout": "2 minutes"}, ["gateway_queue_timeout", "600s, 10m or 500ms"]),
    ("affinity_ttl_not_a_time", {"gateway_affinity_ttl": "ten minutes"}, ["gateway_affinity_ttl", "600s, 10m or 500ms"]),
    ("affinity_zone_not_a_size", {"gateway_affinity_zone_size": "lots"},
     ["gateway_affinity_zone_size='lots'", "Fix: a size such as 8m"]),
    ("affinity_not_a_mode", {"gateway_affinity": "sticky"},
     ["gateway_affinity='sticky'", "Fix: prefix (default), conversation"]),
    ("prefix_imbalance_negative", {"gateway_prefix_max_imbalance": -1},
     ["gateway_prefix_max_imbalance='-1'", "Fix: 2 (the default)"]),
    ("prefix_wait_not_a_time", {"gateway_prefix_max_wait": "a while"},
     ["gateway_prefix_max_wait='a while'", "600s, 10m or 500ms"]),
    ("models_do_not_fit_together",
     {"ollama_gpu_groups": [[0], [1]],
      "ollama_models": [{"name": "herd-large:70b", "vram_gib": 30}, {"name": "herd-small:7b", "vram_gib": 5.5}]},
     ["ollama_models", "instance 0 holds 2 models", "they need about", "Fix: hold fewer models per instance",
      "`instances:`", "ollama_max_loaded_models below the model count with a finite ollama_keep_alive"]),
    ("max_loaded_below_models_keep_forever",
     {"ollama_max_loaded_models": 1, "ollama_models": ["herd-tiny:1b", "herd-small:7b"]},
     ["ollama_max_loaded_models", "instance 0 holds 2", "ollama_keep_alive is '-1'",
      "Fix: let them take turns with a finite ollama_keep_alive"]),
    ("stock_service_on_instance_port", {"ollama_stock_service": "refuse"},
     ["ollama_stock_service", "a stock ollama.service", "takes port 11434", "Fix: stop and disable it",
      "ollama_stock_service: disable"]),
    ("unknown_stock_service_choice", {"ollama_stock_service": "kill"},
     ["ollama_stock_service must be one of: refuse, disable"]),
    ("vip_one_gateway_only", {"gateway_vip_address": "203.0.113.10", "gateway_vip_auth_pass": "herd-lab"},
     ["gateway_vip_address is set but herd-mol-bad is the only host of group gateways", 'set gateway_vip_address to ""']),
    ("vip_outside_network", {"gateway_vip_address": "203.0.113.10", "gateway_vip_auth_pass": "herd-lab"},
     ["gateway_vip_address 203.0.113.10 is outside herd-mol-bad's network", "use a free address of"]),
    ("vip_missing_secret", {"gateway_vip_address": "203.0.113.10"},
     ["gateway_vip_auth_pass is empty", "vault_gateway_vip_auth_pass"]),
    ("vip_router_id_out_of_range", {"gateway_vip_address": "203.0.113.10", "gateway_vip_auth_pass": "herd-lab",
                                    "gateway_vip_router_id": 300}, ["gateway_vip_router_id 300 must be a VRRP id 1-255"]),
    ("vip_password_too_long", {"gateway_vip_address": "203.0.113.10", "gateway_vip_auth_pass": "a-long-vrrp-password"},
     ["gateway_vip_auth_pass is longer than 8 characters"]),
    ("guard_probe_timeout_above_interval", {"guard_probe_timeout": 5, "guard_interval": 2},
     ["guard_probe_timeout above 0 and at most guard_interval"]),
    ("guard_listen_address_not_an_ip", {"guard_listen_address": "localhost"},
     ["guard_listen_address an IP address (is localhost)"]),
    ("guard_watchdog_too_short", {"guard_watchdog_seconds": 1},
     ["guard_watchdog_seconds must be 2 or more (is 1)"]),
    ("guard_stall_and_restart_cap", {"guard_stall_seconds": 1, "guard_restart_max_per_hour": 0},
     ["guard_stall_seconds above guard_interval", "guard_restart_max_per_hour 1 or more"]),
    ("nginx_start_limit_never_reached", {"nginx_start_limit_interval": 3},
     ["nginx_start_limit_interval above nginx_start_limit_burst x nginx_restart_sec", "raise nginx_start_limit_interval"]),
    # The gateway's view of the plans (role gateway, gateway_server_plan), raised in preflight, not in the gateway
    # play after the GPU hosts changed. PEER is a second GPU host (see _peer_inventory): the gateway's "remote" host.
    ("gateway_weight_below_one", {"gateway_weights": {"herd-mol-bad:1": 0}},
     ["gateway_weights: weight of herd-mol-bad:1 must be a whole number, 1 or more", "Fix:"]),
    ("gateway_backend_without_plan", {"gateway_backend_hosts": ["herd-mol-bad", "herd-mol-ghost"]},
     ["no instance plan for herd-mol-ghost", "remove them from gateway_backend_hosts"]),
    ("loopback_instance_behind_remote_gateway", {PEER: {"ollama_bind_address": "127.0.0.1"}},
     ["instance 0 of herd-mol-bad-peer listens on 127.0.0.1 only, so gateway herd-mol-bad cannot reach it",
      "Fix: set ollama_bind_address of herd-mol-bad-peer to 0.0.0.0"]),
    ("two_instances_one_endpoint", {PEER: {"ollama_bind_address": "0.0.0.0", "ollama_advertise_address": "127.0.0.1"}},
     ["instances herd-mol-bad:0 and herd-mol-bad-peer:0 are both reached at 127.0.0.1:11434",
      "Fix: give the hosts distinct addresses (ollama_advertise_address)"]),
    ("bad_advertise_address", {"ollama_advertise_address": "gpu 2"},
     ["ollama_advertise_address on herd-mol-bad", "'gpu 2' is not an IP address or host name", "Fix:"]),
]

# Cases that do not yet fail cleanly in preflight, marked strict xfail with the reason (none left: the four
# gateway defects this suite found are fixed). strict=True: a mark must go when its defect is fixed.
KNOWN_DEFECTS: dict[str, str] = {}

_RESULTS = {}
# The host's facts are gathered once and read from a cache by every case (the preflight play gathers only when the
# cache has none): the cases differ in settings, not in the host. It saves about a fifth of each case's run.
FACT_CACHE = {"ANSIBLE_GATHERING": "smart", "ANSIBLE_CACHE_PLUGIN": "jsonfile", "ANSIBLE_CACHE_PLUGIN_TIMEOUT": "7200",
              "ANSIBLE_CACHE_PLUGIN_CONNECTION": tempfile.mkdtemp(prefix="herd-badinput-facts-")}


def _snapshot():
    run = subprocess.run(["docker", "exec", HOST, "bash", "-c", SNAPSHOT], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


def _peer_inventory(peer_vars):
    """An inventory of PEER_HOST: herd-mol-bad's connection (molecule's inventory) and host_vars, then peer_vars."""
    with open(INVENTORY, encoding="utf-8") as fh:
        molecule_inventory = yaml.safe_load(fh)
    with open(os.path.join(os.path.dirname(__file__), "..", "host_vars", f"{HOST}.yml"), encoding="utf-8") as fh:
        host_vars = yaml.safe_load(fh) or {}
    connection = {}

    def find(node):  # molecule's inventory names the host under all.hosts and under its groups
        if isinstance(node, dict):
            if isinstance(node.get("hosts"), dict) and isinstance(node["hosts"].get(HOST), dict):
                connection.update(node["hosts"][HOST])
            for value in node.values():
                find(value)

    find(molecule_inventory)
    hostvars = {**connection, "ansible_host": connection.get("ansible_host", HOST), **host_vars, **peer_vars}
    return {"all": {"hosts": {PEER_HOST: hostvars},
                    "children": {"lab": {"hosts": {PEER_HOST: None}}, "ollama_hosts": {"hosts": {PEER_HOST: None}}}}}


def _run_case(case_id, extra):
    # A known defect may pass preflight: run only the preflight play (tagged always) so that it cannot
    # deploy the host under the other cases' snapshots.
    tags = ["--tags", "herd-preflight-only"] if case_id in KNOWN_DEFECTS else []
    extra = dict(extra)
    peer = extra.pop(PEER, None)
    inventories = ["-i", INVENTORY]
    temporary = []
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix=f"herd-bad-{case_id}-", delete=False) as fh:
        json.dump(extra, fh)
    temporary.append(fh.name)
    if peer is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".yml", prefix=f"herd-bad-{case_id}-peer-", delete=False) as fh:
            yaml.safe_dump(_peer_inventory(peer), fh)
        temporary.append(fh.name)
        inventories += ["-i", fh.name]
    try:
        run = subprocess.run(
            ["ansible-playbook", f"{PROJECT}/site.yml", *inventories, "-e", f"@{temporary[0]}", *tags],
            capture_output=True, text=True, timeout=300, env={**os.environ, "ANSIBLE_FORCE_COLOR": "0", **FACT_CACHE},
        )
    finally:
        for name in temporary:
            os.unlink(name)
    return {"rc": run.returncode, "out": run.stdout + run.stderr, "snapshot": _snapshot()}


@pytest.fixture(scope="module")
def results():
    if not _RESULTS:
        _RESULTS["_before"] = _snapshot()
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = {cid: pool.submit(_run_case, cid, extra) for cid, extra, _ in CASES}
            for cid, fut in futures.items():
                _RESULTS[cid] = fut.result()
        _RESULTS["_after"] = _snapshot()
    return _RESULTS


def _failing_play(out):
    """Name of the play that holds the first failed task ('fatal:' or 'failed:')."""
    play = None
    for line in out.splitlines():
        m = re.match(r"^PLAY \[(.*)\] \*", line)
        if m:
            play = m.group(1)
        if re.match(r"^(fatal|failed): \[", line):
            return play
    return None


def _check(case_id, expected, res):
    out = res["out"]
    assert res["rc"] != 0, f"{case_id}: site.yml succeeded with a bad setting\n{out[-3000:]}"
    assert _failing_play(out) == PREFLIGHT_PLAY, f"{case_id}: failed outside preflight\n{out[-3000:]}"
    assert "changed=0" in out and not re.search(r"changed=[1-9]", out), out[-3000:]
    flat = " ".join(out.split())  # the yaml callback wraps long messages
    missing = [s for s in expected if s not in flat]
    assert not missing, f"{case_id}: the message lacks {missing}\n{out[-3000:]}"
    assert res["snapshot"] == _RESULTS["_before"], f"{case_id}: files on the host changed"


@pytest.mark.parametrize(
    ("case_id", "extra", "expected"),
    [pytest.param(*c, id=c[0], marks=[pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS[c[0]])] if c[0] in KNOWN_DEFECTS else [])
     for c in CASES],
)
def test_bad_input_fails_in_preflight_and_changes_nothing(case_id, extra, expected, results):
    _check(case_id, expected, results[case_id])


def test_api_keys_never_printed(results):
    for cid, extra, _ in CASES:
        for key in extra.get("gateway_api_keys", []):
            text = key["key"] if isinstance(key, dict) else key
            assert text not in results[cid]["out"], f"{cid}: an API key appears in the output"


def test_counts_and_host_unchanged(results):
    clean = []
    for cid, _, expected in CASES:
        try:
            _check(cid, expected, results[cid])
            clean.append(cid)
        except AssertionError:
            pass
    _measured(f"bad input: {len(CASES)} cases, {len(clean)} fail cleanly in preflight, "
          f"{len(CASES) - len(clean)} known defects: {sorted(set(c for c, _, _ in CASES) - set(clean))}")
    assert len(CASES) >= 25
    assert set(clean) == {c for c, _, _ in CASES} - set(KNOWN_DEFECTS)
    assert results["_after"] == results["_before"], "files on the host changed during the bad-input runs"
