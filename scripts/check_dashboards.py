#!/usr/bin/env python3
"""Check grafana/dashboards/*.json against Grafana's own dashboard models.

The models come from Grafana's `grafana-foundation-sdk` package (PyPI; generated from
Grafana's published schemas; scripts/test.sh installs it). Each dashboard is loaded into
the SDK's `Dashboard` model and written back: a key the model does not know is lost on
the way, so every lost key is a misspelt or invented field. On top of that, what the
models cannot say: required fields, unique panel ids, grid positions inside 24 columns,
every datasource uid provisioned in grafana/provisioning/datasources, every template
variable used in a query or title defined (or one of Grafana's built-ins).

Usage: scripts/check_dashboards.py [grafana dir]   (exit status 1 on any problem)
"""
import json
import pathlib
import re
import sys

import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

BUILTIN_VARS = {"timeFilter", "__interval", "__interval_ms", "__rate_interval", "__range",
                "__range_s", "__range_ms", "__from", "__to", "col", "__name", "__dashboard",
                "__org", "__user", "__timeFilter", "__all"}
# InfluxQL alias patterns: $tag_<key>, $col, $m (measurement).
ALIAS_VARS = re.compile(r"^(tag_\w+|col|m|measurement)$")
VAR_REF = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def lost_keys(original, round_trip, path=""):
    """Keys of `original` that the model did not keep (recursively)."""
    out = []
    if isinstance(original, dict) and isinstance(round_trip, dict):
        for k, v in original.items():
            if k not in round_trip:
                out.append(f"{path}/{k}")
            else:
                out += lost_keys(v, round_trip[k], f"{path}/{k}")
    elif isinstance(original, list) and isinstance(round_trip, list):
        if len(original) != len(round_trip):
            out.append(f"{path} (list of {len(original)} became {len(round_trip)})")
        for i, (a, b) in enumerate(zip(original, round_trip)):
            out += lost_keys(a, b, f"{path}/{i}")
    return out


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent.parent / "grafana")
    register_default_plugins()
    uids = set()
    for f in sorted((root / "provisioning" / "datasources").glob("*.yaml")):
        for ds in yaml.safe_load(f.read_text()).get("datasources", []):
            uids.add(ds["uid"])
    problems = []
    files = sorted((root / "dashboards").glob("*.json"))
    if not files:
        problems.append("no dashboards found")
    dash_uids = set()
    for f in files:
        where = f.name
        data = json.loads(f.read_text())
        model = Dashboard.from_json(data)
        back = json.loads(json.dumps(model.to_json(), cls=JSONEncoder))
        problems += [f"{where}: key not in Grafana's dashboard model: {k}" for k in lost_keys(data, back)]
        for key in ("uid", "title", "schemaVersion", "panels", "templating", "time"):
            if key not in data:
                problems.append(f"{where}: missing {key}")
        if data.get("uid") in dash_uids:
            problems.append(f"{where}: duplicate dashboard uid {data.get('uid')}")
        dash_uids.add(data.get("uid"))
        variables = {v["name"]: v for v in data.get("templating", {}).get("list", [])}
        ds_vars = {n for n, v in variables.items() if v.get("type") == "datasource"}

        def check_ds(ref, at):
            if not isinstance(ref, dict) or "uid" not in ref or "type" not in ref:
                problems.append(f"{where}: {at}: datasource must be {{type, uid}}, got {ref!r}")
                return
            m = re.fullmatch(r"\$\{(\w+)\}", ref["uid"])
            if m:
                if m.group(1) not in ds_vars:
                    problems.append(f"{where}: {at}: datasource variable ${{{m.group(1)}}} is not defined")
                else:
                    default = variables[m.group(1)].get("current", {}).get("value")
                    if default not in uids:
                        problems.append(f"{where}: {at}: variable {m.group(1)} defaults to unprovisioned uid {default!r}")
            elif ref["uid"] not in uids:
                problems.append(f"{where}: {at}: datasource uid {ref['uid']!r} is not provisioned ({sorted(uids)})")
            if "DS_" in json.dumps(ref):
                problems.append(f"{where}: {at}: ${{DS_*}} inputs are not allowed")

        def check_vars(text, at):
            for m in VAR_REF.finditer(text or ""):
                name = next(g for g in m.groups() if g)
                if name in variables or name in BUILTIN_VARS or ALIAS_VARS.match(name):
                    continue
                problems.append(f"{where}: {at}: variable ${name} is not defined")

        for name, v in variables.items():
            if v.get("type") == "query":
                check_ds(v.get("datasource"), f"variable {name}")
                check_vars(v.get("query"), f"variable {name}")
                if not str(v.get("query", "")).strip():
                    problems.append(f"{where}: variable {name} has no query")
        ids = set()
        for p in data.get("panels", []):
            at = f"panel {p.get('id')} {p.get('title')!r}"
            for key in ("id", "type", "title", "gridPos"):
                if key not in p:
                    problems.append(f"{where}: {at}: missing {key}")
            if p.get("id") in ids:
                problems.append(f"{where}: {at}: duplicate panel id")
            ids.add(p.get("id"))
            g = p.get("gridPos", {})
            if not all(isinstance(g.get(k), int) for k in "xywh") or g["x"] + g["w"] > 24 or g["w"] < 1 or g["h"] < 1:
                problems.append(f"{where}: {at}: bad gridPos {g}")
            check_vars(p.get("title"), at)
            if p.get("repeat") and p["repeat"] not in variables:
                problems.append(f"{where}: {at}: repeats over undefined variable {p['repeat']}")
            if p.get("type") == "row":
                continue
            check_ds(p.get("datasource"), at)
            if not p.get("targets"):
                problems.append(f"{where}: {at}: no targets")
            for t in p.get("targets", []):
                check_ds(t.get("datasource"), f"{at} target {t.get('refId')}")
                text = t.get("query") or t.get("expr")
                if not text:
                    problems.append(f"{where}: {at}: target {t.get('refId')} has no query")
                check_vars(text, f"{at} target {t.get('refId')}")
                check_vars(t.get("alias") or t.get("legendFormat"), f"{at} legend")
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print(f"{len(files)} dashboards OK against grafana-foundation-sdk's Dashboard model")


if __name__ == "__main__":
    main()
