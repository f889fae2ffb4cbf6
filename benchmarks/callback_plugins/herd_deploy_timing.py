"""Ansible callback of benchmarks/deploy_bench.py: when each play (each serial batch of a play) started, when each
task started and ended on each host, and the play recap, written as JSON to $HERD_DEPLOY_TIMING at the end of the
run. Enabled by the benchmark only (ANSIBLE_CALLBACK_PLUGINS=benchmarks/callback_plugins,
ANSIBLE_CALLBACKS_ENABLED=herd_deploy_timing); it prints nothing, the configured stdout callback still does."""

from __future__ import annotations

import json
import os
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: herd_deploy_timing
type: aggregate
short_description: Per-host task start and end times for herd's deployment benchmark
description:
  - Records the start of every play (Ansible starts a play again for each batch of C(serial)), the start and end
    of every task on every host (wall clock, seconds since the epoch) and the play recap, and writes them as one
    JSON document to the file named by the environment variable E(HERD_DEPLOY_TIMING) when the run ends.
requirements:
  - the environment variable E(HERD_DEPLOY_TIMING) names the output file
"""


def _host_of(result):
    return getattr(result, "host", None) or result._host


def _task_of(result):
    return getattr(result, "task", None) or result._task


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "herd_deploy_timing"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._plays = []
        self._tasks = []
        self._open = {}
        self._started = time.time()

    # Plays: one entry per batch of a serial play.
    def v2_playbook_on_play_start(self, play):
        self._plays.append({"name": play.get_name().strip(), "start": time.time()})
        # Written at every play start as well: a run stopped halfway still tells its finished plays and batches.
        self._write(None)

    def v2_runner_on_start(self, host, task):
        key = (host.get_name(), task._uuid)
        entry = {"host": host.get_name(), "task": task.get_name().strip(), "action": task.action,
                 "play": len(self._plays) - 1, "start": time.time(), "end": None, "status": None}
        self._open[key] = entry
        self._tasks.append(entry)

    def _done(self, result, status):
        key = (_host_of(result).get_name(), _task_of(result)._uuid)
        entry = self._open.pop(key, None)
        if entry is not None:
            entry["end"] = time.time()
            entry["status"] = status

    def v2_runner_on_ok(self, result):
        self._done(result, "changed" if result.is_changed() else "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._done(result, "ignored" if ignore_errors else "failed")

    def v2_runner_on_skipped(self, result):
        self._done(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._done(result, "unreachable")

    def _write(self, recap):
        path = os.environ.get("HERD_DEPLOY_TIMING")
        if not path:
            return
        doc = {"started": self._started, "ended": time.time(), "plays": self._plays, "tasks": self._tasks,
               "recap": recap, "finished": recap is not None}
        with open(path + ".new", "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
        os.replace(path + ".new", path)

    def v2_playbook_on_stats(self, stats):
        self._write({h: stats.summarize(h) for h in sorted(stats.processed)})
