"""One endpoint table: role gateway's _gateway_endpoints feeds the Lua (settings) and docs/gateway.md shows it row
for row; this test fails when they part."""

import os

from conftest import ROOT, role_vars

MODEL_FROM = {"model": "`model`", "model|name": "`model` (else `name`)", "path": "the path", "": "none"}
USAGE = {"native": "`prompt_eval_count`, `eval_count`", "openai": "`usage.prompt_tokens`, `completion_tokens`",
         "io": "`usage.input_tokens`, `output_tokens`", "": "-"}


def table_rows():
    rows = ["| path | methods | model named by | dialect | since Ollama | body limit | affinity | tokens from |",
            "|---|---|---|---|---|---|---|---|"]
    for e in role_vars()["_gateway_endpoints"]:
        rows.append(f"| `{e['path']}` | {', '.join(e['methods'])} | {MODEL_FROM[e['model']]} | {e['dialect']} | "
                    f"{e['since']} | {e['body']} | {e['affinity'] or '-'} | {USAGE[e['usage']]} |")
    return rows


def test_docs_show_the_endpoint_table_of_the_role():
    with open(os.path.join(ROOT, "docs", "gateway.md"), encoding="utf-8") as handle:
        docs = handle.read()
    missing = [row for row in table_rows() if row not in docs]
    assert not missing, "docs/gateway.md lacks these rows of _gateway_endpoints:\n" + "\n".join(missing)


def test_every_endpoint_is_well_formed():
    for e in role_vars()["_gateway_endpoints"]:
        assert e["path"].startswith("/") and e["methods"] and e["dialect"] in ("ollama", "openai", "anthropic"), e
        assert e["kind"] in ("native", "compat", "show", "catalogue", "any") and e["body"] in ("inference", "embedding", "small"), e
        assert e["model"] in MODEL_FROM and e["affinity"] in ("", "chat", "prompt", "messages", "responses"), e
        assert (e["model"] == "path") == e["path"].endswith("{model}"), e
        # Only answers of inference and embedding endpoints carry token counts.
        assert e["usage"] in USAGE and (e["usage"] == "" or e["body"] != "small"), e
