//! Offline checks of `deploy/`, run by `cargo xtask test` (and alone by the hidden
//! `cargo xtask manifests`):
//!
//! - **Kubernetes**: every resource in `deploy/kubernetes/` validates against the schemas of
//!   Kubernetes [`KUBERNETES_VERSION`], strictly (unknown fields are errors), with a pinned
//!   `kubernetes-validate`, which bundles the schemas: once its venv exists (under the target
//!   directory, reused), nothing is fetched. The kustomization lists exactly the YAML files
//!   there; the ConfigMap's `shadow.toml` passes `shadow-agent check-config`; the probes, the
//!   container port and the scrape annotation use the `[admin] listen` port; the container runs
//!   the config file the ConfigMap is mounted as; `[admin] token_file` is a key of a Secret of
//!   the kustomization's `secretGenerator`, mounted read-only with a mode other users cannot
//!   read, the pod has an `fsGroup` so the agent can, and `SHADOW_ADMIN_TOKEN_FILE` names it.
//! - **Grafana**: every expression of `deploy/grafana/shadow-dashboard.json` parses as PromQL
//!   (`promql-parser`, the Python binding of the Rust parser), and every metric it names is one
//!   the agent exports. The exported names are derived from the agent's sources, where each
//!   group of counters declares its metrics (see [`exported_metrics`]), so a renamed or removed
//!   metric fails this check instead of leaving an empty panel.
//! - **Rollout gates**: the YAML blocks of `README.md` and `docs/verdict.md` (the Argo Rollouts
//!   `AnalysisTemplate` and the Flagger `MetricTemplate` that gate on `shadow_verdict`) parse,
//!   each template's Prometheus query parses as PromQL, and the metrics they name are exported,
//!   `shadow_verdict` among them.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{cargo, root, run::run, target_dir, venv::Venv};

/// The Kubernetes version the manifests are validated against (the pinned kubernetes-validate
/// bundles schemas up to 1.31); they use only stable v1 APIs, which newer versions keep.
const KUBERNETES_VERSION: &str = "1.30.0";

/// Everything installed in the venv, pinned, transitive dependencies included.
const PYTHON_PACKAGES: &[&str] = &[
    "kubernetes-validate==1.31.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "attrs==26.1.0",
    "PyYAML==6.0.4",
    "packaging==26.4",
    "importlib_resources==7.1.0",
    "typing_extensions==4.16.0",
    "promql-parser==0.11.0",
];

/// The checks that need YAML or PromQL, run with the venv's Python.
const HELPER: &str = r#"
import json, pathlib, re, sys
import yaml

def kube(directory, config_out):
    d = pathlib.Path(directory)
    kustomization = yaml.safe_load((d / "kustomization.yaml").read_text())
    listed = set(kustomization.get("resources", []))
    present = {p.name for p in d.glob("*.yaml") if p.name != "kustomization.yaml"}
    if listed != present:
        fail(f"kustomization.yaml lists {sorted(listed)}, the folder has {sorted(present)}")
    docs = [doc for name in sorted(present) for doc in yaml.safe_load_all((d / name).read_text()) if doc]
    by_kind = {doc["kind"]: doc for doc in docs}
    config = by_kind["ConfigMap"]["data"]["shadow.toml"]
    pathlib.Path(config_out).write_text(config)
    listen = re.search(r'^\s*listen\s*=\s*"[^"]*:(\d+)"', config, re.M)
    if not listen:
        fail("no [admin] listen in the ConfigMap's shadow.toml")
    port = int(listen.group(1))
    pod = by_kind["DaemonSet"]["spec"]["template"]
    c = pod["spec"]["containers"][0]
    used = {
        "annotation prometheus.io/port": int(pod["metadata"]["annotations"]["prometheus.io/port"]),
        "livenessProbe": c["livenessProbe"]["httpGet"]["port"],
        "readinessProbe": c["readinessProbe"]["httpGet"]["port"],
        "containerPort": c["ports"][0]["containerPort"],
    }
    for what, p in used.items():
        if p != port:
            fail(f"daemonset.yaml: {what} is {p}, [admin] listen is port {port}")
    mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "config")
    config_arg = c["command"][c["command"].index("--config") + 1]
    if config_arg != mount.rstrip("/") + "/shadow.toml":
        fail(f"daemonset.yaml: --config {config_arg}, but the ConfigMap is mounted at {mount}")
    admin_token(kustomization, pod, c, config)
    rbac(docs, pod)

def rbac(docs, pod):
    # Read-only, and only what routes naming workloads need: the node's pods, the DaemonSet.
    account = pod["spec"]["serviceAccountName"]
    roles = [d for d in docs if d["kind"] in ("ClusterRole", "Role")]
    if not roles:
        fail("no Role or ClusterRole for the agent's account")
    for role in roles:
        for rule in role.get("rules", []):
            if not set(rule.get("verbs", [])) <= {"get", "list", "watch"}:
                fail(f"rbac: {role['kind']} {role['metadata']['name']} allows {rule['verbs']}; read-only verbs only")
            if not set(rule.get("resources", [])) <= {"pods", "daemonsets"}:
                fail(f"rbac: {role['kind']} {role['metadata']['name']} names {rule['resources']}; pods and daemonsets only")
            if "daemonsets" in rule.get("resources", []) and rule.get("resourceNames") != [pod_owner(docs)]:
                fail("rbac: daemonsets are readable by the agent's own DaemonSet's name only")
    for binding in (d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        if not any(s["kind"] == "ServiceAccount" and s["name"] == account for s in binding["subjects"]):
            fail(f"rbac: {binding['kind']} {binding['metadata']['name']} does not bind {account}")

def pod_owner(docs):
    return next(d["metadata"]["name"] for d in docs if d["kind"] == "DaemonSet")

def admin_token(kustomization, pod, c, config):
    found = re.search(r'^\s*token_file\s*=\s*"([^"]*)"', config, re.M)
    if not found:
        fail("no [admin] token_file in the ConfigMap's shadow.toml")
    token_file = pathlib.PurePosixPath(found.group(1))
    mount = next((m for m in c["volumeMounts"]
                  if pathlib.PurePosixPath(m["mountPath"]) == token_file.parent), None)
    if not mount or not mount.get("readOnly"):
        fail(f"daemonset.yaml: no read-only volume at {token_file.parent} for token_file {token_file}")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    secret = volume.get("secret")
    generated = {g["name"]: g for g in kustomization.get("secretGenerator", [])}
    if not secret or secret["secretName"] not in generated:
        fail(f"daemonset.yaml: {token_file.parent} is not a Secret of the kustomization's secretGenerator")
    keys = {f.split("=", 1)[0] if "=" in f else pathlib.PurePosixPath(f).name
            for f in generated[secret["secretName"]].get("files", [])}
    if token_file.name not in keys:
        fail(f"kustomization.yaml: the Secret {secret['secretName']} has no key {token_file.name}")
    # Kubernetes' default mode is 0644, which the agent refuses; fsGroup lets the non-root agent
    # read a file that only its group may.
    if secret.get("defaultMode", 0o644) & 0o007:
        fail(f"daemonset.yaml: the token's Secret volume has a defaultMode other users can read")
    if "fsGroup" not in pod["spec"].get("securityContext", {}):
        fail("daemonset.yaml: without fsGroup the non-root agent cannot read the token's file")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    if env.get("SHADOW_ADMIN_TOKEN_FILE") != str(token_file):
        fail(f"daemonset.yaml: SHADOW_ADMIN_TOKEN_FILE is not {token_file}, for `kubectl exec ... shadow-agent status`")

def promql(dashboard):
    exprs = []
    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                if k == "expr" and isinstance(x, str):
                    exprs.append(x)
                elif k == "definition" and isinstance(x, str):
                    m = re.fullmatch(r"label_values\((\w+)\s*,\s*\w+\)", x)
                    if not m:
                        fail(f"unsupported variable query: {x}")
                    print(m.group(1))
                else:
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    walk(json.loads(pathlib.Path(dashboard).read_text()))
    if not exprs:
        fail("no expressions in the dashboard")
    for e in exprs:
        # Grafana's interval variables are not PromQL; label variables only occur in strings.
        try:
            tree = promql_parser.parse(re.sub(r"\$__\w+", "5m", e))
        except Exception as err:
            fail(f"not PromQL: {e}: {err}")
        names(tree, e)

def names(node, expr):
    if isinstance(node, promql_parser.VectorSelector):
        name = node.name or next((m.value for m in node.matchers.matchers
                                  if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal), None)
        if not name:
            fail(f"a selector without a metric name in: {expr}")
        print(name)
        return
    for attr in ("expr", "lhs", "rhs", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None:
            names(child, expr)
    for child in getattr(node, "args", None) or []:
        names(child, expr)

def rollouts(*files):
    kinds = set()
    for f in files:
        text = pathlib.Path(f).read_text()
        for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
            try:
                docs = [d for d in yaml.safe_load_all(block) if d]
            except yaml.YAMLError as err:
                fail(f"{f}: YAML that does not parse: {err}")
            for doc in docs:
                kind = doc.get("kind")
                if kind is not None:
                    kinds.add(kind)
                queries = []
                if kind == "AnalysisTemplate":
                    for m in doc["spec"]["metrics"]:
                        queries.append(m["provider"]["prometheus"]["query"])
                        for c in ("successCondition", "failureCondition"):
                            if "result[0]" not in m.get(c, ""):
                                fail(f"{f}: {kind} metric {m.get('name')} has no {c} on result[0]")
                elif kind == "MetricTemplate":
                    if doc["spec"]["provider"]["type"] != "prometheus":
                        fail(f"{f}: {kind} whose provider is not prometheus")
                    queries.append(doc["spec"]["query"])
                for q in queries:
                    try:
                        tree = promql_parser.parse(q)
                    except Exception as err:
                        fail(f"{f}: not PromQL: {q}: {err}")
                    names(tree, q)
    for want in ("AnalysisTemplate", "MetricTemplate"):
        if want not in kinds:
            fail(f"no {want} in {files}")

def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)

import promql_parser
{"kube": kube, "promql": promql, "rollouts": rollouts}[sys.argv[1]](*sys.argv[2:])
"#;

/// Runs every check; see the module documentation.
pub fn validate() -> Result<()> {
    let venv = Venv::ensure(
        target_dir().join("manifest-venv"),
        PYTHON_PACKAGES,
        "the manifest checks",
    )?;
    let helper = venv.dir().join("deploy_checks.py");
    fs::write(&helper, HELPER)?;
    kubernetes(&venv, &helper)?;
    dashboard(&venv, &helper)?;
    rollout_gates(&venv, &helper)?;
    eprintln!("xtask: deploy/ manifests, the dashboard and the rollout gates are valid");
    Ok(())
}

fn kubernetes(venv: &Venv, helper: &Path) -> Result<()> {
    let dir = root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml" || e == "yml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "no manifests in {}", dir.display());
    run(venv
        .command("kubernetes-validate")
        .args([
            "--strict",
            "--quiet",
            "--kubernetes-version",
            KUBERNETES_VERSION,
        ])
        .args(&files))
    .context("a manifest in deploy/kubernetes does not validate")?;

    let config = venv.dir().join("configmap-shadow.toml");
    run(venv
        .command("python")
        .arg(helper)
        .arg("kube")
        .arg(&dir)
        .arg(&config))
    .context("deploy/kubernetes is not consistent")?;
    run(cargo()
        .args([
            "run",
            "--quiet",
            "--package",
            "shadow-agent",
            "--bin",
            "shadow-agent",
        ])
        .arg("--")
        .arg("check-config")
        .arg(&config))
    .context(
        "the ConfigMap's shadow.toml does not pass check-config (lines count from its first line)",
    )
}

fn dashboard(venv: &Venv, helper: &Path) -> Result<()> {
    let path = root().join("deploy/grafana/shadow-dashboard.json");
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let json: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    ensure!(
        json["__inputs"]
            .as_array()
            .is_some_and(|i| i.iter().any(|i| i["name"] == "DS_PROMETHEUS")),
        "the dashboard has no DS_PROMETHEUS input"
    );
    let mut ids = BTreeSet::new();
    for panel in json["panels"].as_array().context("no panels")? {
        let title = panel["title"].as_str().unwrap_or("?");
        ensure!(
            ids.insert(panel["id"].as_u64().context("a panel without id")?),
            "panel id of `{title}` used twice"
        );
        if panel["type"] != "row" {
            ensure!(
                panel["datasource"]["uid"] == "${DS_PROMETHEUS}",
                "panel `{title}` does not use ${{DS_PROMETHEUS}}"
            );
        }
    }

    let out = venv
        .command("python")
        .arg(helper)
        .arg("promql")
        .arg(&path)
        .output()?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let used: BTreeSet<String> = String::from_utf8(out.stdout)?
        .lines()
        .map(str::to_owned)
        .collect();
    let exported = exported_metrics(
        &agent_sources()?,
        &fs::read_to_string(root().join("shadow-agent/src/admin/metrics.rs"))?,
    )?;
    let unknown: Vec<&String> = used.difference(&exported).collect();
    ensure!(
        unknown.is_empty(),
        "the dashboard uses metrics the agent does not export: {unknown:?}\nexported: {exported:?}"
    );
    Ok(())
}

/// The Argo Rollouts and Flagger templates of the documentation: see the module documentation.
fn rollout_gates(venv: &Venv, helper: &Path) -> Result<()> {
    let files = [root().join("README.md"), root().join("docs/verdict.md")];
    let out = venv
        .command("python")
        .arg(helper)
        .arg("rollouts")
        .args(&files)
        .output()?;
    if !out.status.success() {
        bail!(
            "the rollout gates of README.md and docs/verdict.md: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let used: BTreeSet<String> = String::from_utf8(out.stdout)?
        .lines()
        .map(str::to_owned)
        .collect();
    ensure!(
        used.contains("shadow_verdict"),
        "the rollout gates do not query shadow_verdict: {used:?}"
    );
    let exported = exported_metrics(
        &agent_sources()?,
        &fs::read_to_string(root().join("shadow-agent/src/admin/metrics.rs"))?,
    )?;
    let unknown: Vec<&String> = used.difference(&exported).collect();
    ensure!(
        unknown.is_empty(),
        "the rollout gates use metrics the agent does not export: {unknown:?}"
    );
    Ok(())
}

/// Every `.rs` file of `shadow-agent/src`, with its path, in a stable order.
fn agent_sources() -> Result<Vec<(String, String)>> {
    fn walk(dir: &std::path::Path, out: &mut Vec<(String, String)>) -> Result<()> {
        let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
        entries.sort_by_key(|e| e.path());
        for entry in entries {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push((path.display().to_string(), fs::read_to_string(&path)?));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(&root().join("shadow-agent/src"), &mut out)?;
    Ok(out)
}

/// The metric names in the agent's exposition (with `_total`, unit and histogram suffixes),
/// derived from its source files, `sources` (path and text):
///
/// Each group of counters declares its metrics where it is defined, through the helpers of
/// `admin/export.rs`. Outside a file's `mod tests`, every call of `export::counter`,
/// `export::counters` (name: 2nd argument, unit: 4th), `export::gauge`, `export::gauges` (name:
/// 2nd) and `export::histograms` (name: 2nd; seconds) names a family. A name is a string
/// literal, or the loop variable of `for (name, ...) in ARRAY` over a `let ARRAY... = [...]` of
/// tuples whose first element is the literal. As the registry does, every name gets the prefix
/// `shadow_`, then `_bytes` or `_seconds` for a unit, then `_total` for a counter, or `_bucket`,
/// `_sum` and `_count` for a histogram.
///
/// A shape of code this does not understand is an error, not a guess. As a check on the rules,
/// every `shadow_…` name that the unit test of `admin/metrics.rs` (`metrics_tests`) finds in
/// the real exposition must be among the derived ones.
pub fn exported_metrics(
    sources: &[(String, String)],
    metrics_tests: &str,
) -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for (path, source) in sources {
        // The code before the file's `mod tests` (other `#[cfg(test)]` items count as code).
        let code = source
            .match_indices("#[cfg(test)]")
            .find(|(i, m)| source[i + m.len()..].trim_start().starts_with("mod tests"))
            .map_or(source.as_str(), |(i, _)| &source[..i]);
        let body = strip_comments(code);
        derive_names(&body, &mut names).with_context(|| path.clone())?;
    }
    ensure!(
        names.len() >= 20,
        "only {} metric names found in the agent's sources; has the code changed shape? {names:?}",
        names.len()
    );

    let tests = metrics_tests
        .split_once("#[cfg(test)]")
        .map_or("", |(_, tests)| tests);
    let expected: Vec<&str> = string_literals(tests)
        .into_iter()
        .filter(|s| s.starts_with("shadow_"))
        .filter_map(|s| s.split(['{', ' ']).next())
        .collect();
    ensure!(
        !expected.is_empty(),
        "metrics.rs: its unit test names no `shadow_…` line to check the derived names against"
    );
    for name in expected {
        ensure!(
            names.contains(name),
            "metrics.rs: its unit test expects `{name}`, which xtask did not derive from the \
             code: update `exported_metrics` in xtask/src/manifests.rs. Derived: {names:?}"
        );
    }
    Ok(names)
}

/// Adds the families whose export calls `body` holds to `names`.
fn derive_names(body: &str, names: &mut BTreeSet<String>) -> Result<()> {
    for (helper, unit_at, kind) in [
        ("export::counter", Some(3), "counter"),
        ("export::counters", Some(3), "counter"),
        ("export::gauge", None, "gauge"),
        ("export::gauges", None, "gauge"),
        ("export::histograms", None, "histogram"),
    ] {
        for call in calls(body, helper) {
            let args = split_args(&body[call..])?;
            let arg = |i: usize| {
                args.get(i)
                    .map(|a| a.trim())
                    .with_context(|| format!("`{helper}(` with too few arguments"))
            };
            let unit = match (kind, unit_at.map(arg).transpose()?) {
                ("histogram", _) => "_seconds",
                (_, None | Some("None")) => "",
                (_, Some("Some(&Unit::Bytes)")) => "_bytes",
                (_, Some("Some(&Unit::Seconds)")) => "_seconds",
                (_, Some(other)) => bail!("unit `{other}` unknown to xtask"),
            };
            for name in resolve_name(body, call, arg(1)?)? {
                let base = format!("shadow_{name}{unit}");
                match kind {
                    "counter" => {
                        names.insert(format!("{base}_total"));
                    }
                    "histogram" => {
                        for suffix in ["_bucket", "_sum", "_count"] {
                            names.insert(format!("{base}{suffix}"));
                        }
                    }
                    _ => {
                        names.insert(base);
                    }
                }
            }
        }
    }
    Ok(())
}

/// The positions just after `name(` of calls (not definitions) of `name`.
fn calls(code: &str, name: &str) -> Vec<usize> {
    let pattern = format!("{name}(");
    code.match_indices(&pattern)
        .filter(|(i, _)| {
            let before = &code[..*i];
            !before.ends_with(|c: char| c.is_alphanumeric() || c == '_')
                && !before.trim_end().ends_with("fn")
        })
        .map(|(i, _)| i + pattern.len())
        .collect()
}

/// The top-level arguments of the call whose argument list starts at `text[0]`, up to its `)`.
fn split_args(text: &str) -> Result<Vec<&str>> {
    let mut args = Vec::new();
    let (mut depth, mut start, mut in_string, mut escaped) = (0usize, 0, false, false);
    for (i, c) in text.char_indices() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' if depth > 0 => depth -= 1,
            ')' | ']' | '}' => {
                args.push(&text[start..i]);
                return Ok(args.into_iter().filter(|a| !a.trim().is_empty()).collect());
            }
            ',' if depth == 0 => {
                args.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    bail!("metrics.rs: unbalanced call")
}

/// The metric names an argument stands for: a literal, or a loop variable over an array.
fn resolve_name(body: &str, call: usize, arg: &str) -> Result<Vec<String>> {
    if let Some(literal) = arg.strip_prefix('"').and_then(|a| a.strip_suffix('"')) {
        return Ok(vec![literal.to_owned()]);
    }
    let shape = || format!("metrics.rs: cannot tell which metric `{arg}` names");
    let ident = arg;
    let loop_at = body[..call]
        .rfind(&format!("for ({ident},"))
        .with_context(shape)?;
    let after_in = body[loop_at..]
        .find(") in ")
        .map(|i| loop_at + i + ") in ".len())
        .with_context(shape)?;
    let array: String = body[after_in..]
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    let let_at = body[..loop_at]
        .rfind(&format!("let {array}"))
        .with_context(shape)?;
    let open = body[let_at..]
        .find("= [")
        .map(|i| let_at + i + "= [".len())
        .with_context(shape)?;
    let mut names = Vec::new();
    for tuple in split_args(&body[open..])? {
        let tuple = tuple.trim().strip_prefix('(').with_context(shape)?;
        let first = split_args(tuple)?.first().map(|a| a.trim().to_owned());
        match first
            .as_deref()
            .and_then(|f| f.strip_prefix('"')?.strip_suffix('"'))
        {
            Some(name) => names.push(name.to_owned()),
            None => bail!(shape()),
        }
    }
    Ok(names)
}

/// The code without `//` comments (string literals kept as they are).
fn strip_comments(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let (mut in_string, mut escaped, mut in_comment) = (false, false, false);
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        if in_comment {
            if c == '\n' {
                in_comment = false;
                out.push(c);
            }
            continue;
        }
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if c == '/' && chars.peek() == Some(&'/') {
            in_comment = true;
            continue;
        }
        out.push(c);
    }
    out
}

/// The contents of the string literals in `code`, escapes as written.
fn string_literals(code: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut escaped) = (None, false);
    for (i, c) in code.char_indices() {
        match (start, c) {
            (Some(_), _) if escaped => escaped = false,
            (Some(_), '\\') => escaped = true,
            (Some(s), '"') => {
                out.push(&code[s..i]);
                start = None;
            }
            (None, '"') => start = Some(i + 1),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_the_exposition_names_of_the_agents_sources() {
        let metrics = fs::read_to_string(root().join("shadow-agent/src/admin/metrics.rs"))
            .expect("metrics.rs");
        let names =
            exported_metrics(&agent_sources().expect("sources"), &metrics).expect("derives");
        for name in [
            "shadow_kernel_packets_seen_total",
            "shadow_kernel_ringbuf_full_total",
            "shadow_kernel_written_bytes_total",
            "shadow_copies_sent_total",
            "shadow_copies_sent_bytes_total",
            "shadow_capture_channel_fill_ratio",
            "shadow_shadow_latency_seconds_bucket",
            "shadow_config_generation",
        ] {
            assert!(names.contains(name), "{name} missing from {names:?}");
        }
        assert!(!names.contains("shadow_config_generation_total"));
        assert!(
            !names.contains("shadow_route"),
            "a label taken for a metric"
        );
    }

    #[test]
    fn a_name_in_a_comment_or_a_test_is_not_a_metric() {
        let source = r#"
            impl Export for Thing {
                fn export(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
                    // export::counter(e, "commented", "x", None, 1)?;
                    let fields: [(&str, &str, u64); 2] = [("a", "A.", 1), ("b", "B, b.", 2)];
                    for (name, help, value) in fields {
                        export::counter(e, name, help, None, value)?;
                    }
                    export::gauge(e, "g", "G (0, 1).", 0.0)?;
                    export::histograms(e, "lat", "L.", rows)?;
                    export::counters(e, "c", "C.", Some(&Unit::Bytes), rows)
                }
            }
            #[cfg(test)]
            mod tests {
                fn t() { export::counter(e, "in_a_test", "T.", None, 1); }
            }
        "#;
        let sources = [("thing.rs".to_owned(), source.to_owned())];
        let err = exported_metrics(&sources, "#[cfg(test)] \"shadow_a_total 1\"")
            .expect_err("too few names");
        let message = format!("{err:#}");
        for name in [
            "shadow_a_total",
            "shadow_b_total",
            "shadow_g",
            "shadow_lat_seconds_bucket",
            "shadow_c_bytes_total",
        ] {
            assert!(message.contains(name), "{name} not in {message}");
        }
        assert!(!message.contains("commented"), "{message}");
        assert!(!message.contains("in_a_test"), "{message}");
    }
}
