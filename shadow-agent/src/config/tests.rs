use super::*;

const MINIMAL: &str = r#"
[capture]
interfaces = ["eth0"]
ports = [8080]

[[route]]
name = "api"
match = { port = 8080 }
targets = ["http://shadow:8080"]
"#;

fn errors(src: &str) -> Vec<ConfigIssue> {
    match Config::from_toml(src, "test.toml") {
        Ok(_) => panic!("expected errors in:\n{src}"),
        Err(e) => e.issues,
    }
}

/// The example shipped in the repository passes, with the values it sets.
#[test]
fn example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/shadow.toml");
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(config.capture.interfaces, ["eth0", "veth*"]);
    assert_eq!(config.capture.ports, BTreeSet::from([8080, 9090]));
    assert_eq!(config.capture.sample_percent.get(), 50.0);
    assert_eq!(config.routes.len(), 2);
    let api = &config.routes[0];
    assert_eq!(api.name, "checkout-api");
    assert_eq!(api.matcher.host.as_deref(), Some("shop.example.com"));
    assert!(matches!(&api.matcher.path, Some(PathMatch::Prefix(p)) if p == "/api/"));
    assert_eq!(
        api.targets[1],
        Target::parse("http://10.0.3.17:8080").expect("valid")
    );
    assert!(api.allow_methods.contains(Method::Post));
    assert_eq!(api.deny_paths.len(), 2);
    let everywhere: Vec<&str> = config
        .policy
        .deny_paths
        .iter()
        .map(|g| g.as_str())
        .collect();
    assert_eq!(everywhere, ["**/.env", "**/.git/**"]);
    assert_eq!(
        api.set_headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().expect("ascii")))
            .collect::<Vec<_>>(),
        [("x-environment", "shadow")]
    );
    assert!(api.remove_headers.iter().any(|n| n == "authorization"));
    assert_eq!(api.host, HostRule::Target);
    let catalog = &config.routes[1];
    assert!(matches!(&catalog.matcher.path, Some(PathMatch::Regex(_))));
    assert_eq!(catalog.allow_methods, Methods::SAFE);
    assert_eq!(catalog.host, HostRule::Preserve);
    assert_eq!(config.budget.node_bytes_per_sec, 10_485_760.0);
    assert_eq!(config.budget.timeout, Duration::from_secs(2));
    assert_eq!(config.tagging, TaggingConfig::default());
    assert_eq!(config.admin, AdminConfig::default());
    let ramp = config.ramp.expect("ramp");
    assert_eq!(
        ramp.steps
            .iter()
            .map(|s| s.percent.get())
            .collect::<Vec<_>>(),
        [5.0, 10.0, 25.0, 50.0, 100.0]
    );
    assert_eq!(ramp.guard.max_p99, Some(Duration::from_millis(800)));
}

#[test]
fn defaults() {
    let config = match Config::from_toml(MINIMAL, "minimal.toml") {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(config.capture.hooks, BTreeSet::from([Hook::Ingress]));
    assert_eq!(config.capture.sample_percent, Percent::ALL);
    assert!(!config.capture.kernel_log);
    assert!(config.policy.deny_paths.is_empty());
    let route = &config.routes[0];
    assert_eq!(route.sample_percent, Percent::ALL);
    assert_eq!(route.allow_methods, Methods::SAFE);
    assert_eq!(route.host, HostRule::Preserve);
    assert!(route.matcher.methods.is_none());
    assert_eq!(config.budget, BudgetConfig::default());
    assert_eq!(config.tagging.header.0, "x-shadow-request");
    assert_eq!(config.tagging.header.1, "1");
    assert_eq!(config.tagging.idempotency_header, "idempotency-key");
    assert!(config.tagging.baggage);
    assert_eq!(
        config.admin.listen,
        DEFAULT_ADMIN_LISTEN.parse::<SocketAddr>().expect("valid")
    );
    assert!(config.ramp.is_none());
}

#[test]
fn the_kernel_log_is_switched_on_in_capture() {
    let src = MINIMAL.replace("ports = [8080]", "ports = [8080]\nkernel_log = true");
    match Config::from_toml(&src, "kernel_log.toml") {
        Ok(c) => assert!(c.capture.kernel_log),
        Err(e) => panic!("{e}"),
    }
}

/// One bad value at a time, in a file that is otherwise MINIMAL: (replace, with, line, key,
/// part of the message).
#[test]
fn single_errors() {
    let cases: &[(&str, &str, usize, &str, &str)] = &[
        (
            "match = { port = 8080 }",
            "match = { port = \"http\" }",
            8,
            "route[0].match.port",
            "name the workload too",
        ),
        (
            "match = { port = 8080 }",
            "match = { port = \"Http-\", namespace = \"shop\" }",
            8,
            "route[0].match.port",
            "not a port name",
        ),
        (
            "match = { port = 8080 }",
            "match = { port = 8080, namespace = \"Shop\" }",
            8,
            "route[0].match.namespace",
            "not a namespace name",
        ),
        (
            "match = { port = 8080 }",
            "match = { port = 8080, labels = { \"-app\" = \"orders\" } }",
            8,
            "route[0].match.labels.-app",
            "not a label key",
        ),
        (
            "match = { port = 8080 }",
            "match = { port = 8080, labels = { app = \"orders!\" } }",
            8,
            "route[0].match.labels.app",
            "not a label value",
        ),
        (
            "match = { port = 8080 }",
            "match = { port = 8080, namespace = \"shop\", labels = {} }",
            8,
            "route[0].match.labels",
            "no label given",
        ),
        (
            "match = { port = 8080 }",
            "match = { port = 8080 }\nsample_key = \"user\"",
            9,
            "route[0].sample_key",
            "expected `header:NAME` or `cookie:NAME`",
        ),
        (
            "match = { port = 8080 }",
            "match = { port = 8080 }\nsample_key = \"header:x user\"",
            9,
            "route[0].sample_key",
            "not a header name",
        ),
        (
            "match = { port = 8080 }",
            "match = { port = 8080 }\nsample_key = \"cookie:a;b\"",
            9,
            "route[0].sample_key",
            "not a cookie name",
        ),
        (
            "ports = [8080]",
            "ports = [8080]\n[policy]\nsample_seed = -1",
            6,
            "policy.sample_seed",
            "0 or more",
        ),
        (
            "ports = [8080]",
            "ports = [0, 8080]",
            4,
            "capture.ports[0]",
            "1 to 65535",
        ),
        (
            "ports = [8080]",
            "ports = [70000, 8080]",
            4,
            "capture.ports[0]",
            "1 to 65535",
        ),
        (
            "ports = [8080]",
            "ports = [8080]\nsample_percent = 101",
            5,
            "capture.sample_percent",
            "between 0 and 100",
        ),
        (
            "ports = [8080]",
            "ports = [8080]\nkernel_log = \"yes\"",
            5,
            "capture.kernel_log",
            "expected a boolean",
        ),
        (
            "ports = [8080]",
            "ports = [8080]\nhooks = [\"sideways\"]",
            5,
            "capture.hooks[0]",
            "unknown hook",
        ),
        (
            "ports = [8080]",
            "ports = [8080]\nhook = [\"ingress\"]",
            5,
            "capture.hook",
            "unknown field `hook`",
        ),
        (
            "[\"eth0\"]",
            "[\"an-interface-name-far-too-long\"]",
            3,
            "capture.interfaces[0]",
            "1 to 15",
        ),
        (
            "{ port = 8080 }",
            "{ port = 0 }",
            8,
            "route[0].match.port",
            "1 to 65535",
        ),
        (
            "{ port = 8080 }",
            "{ port = 9090 }",
            8,
            "route[0].match.port",
            "not in `capture.ports`",
        ),
        (
            "{ port = 8080 }",
            "{ port = 8080, paht_prefix = \"/\" }",
            8,
            "route[0].match.paht_prefix",
            "unknown field `paht_prefix`",
        ),
        (
            "{ port = 8080 }",
            "{ port = 8080, path_prefix = \"/a\", path_regex = \"^/b\" }",
            8,
            "route[0].match.path_regex",
            "not both",
        ),
        (
            "{ port = 8080 }",
            "{ port = 8080, path_prefix = \"a\" }",
            8,
            "route[0].match.path_prefix",
            "starts with `/`",
        ),
        (
            "{ port = 8080 }",
            "{ port = 8080, path_regex = \"(\" }",
            8,
            "route[0].match.path_regex",
            "invalid regex",
        ),
        (
            "{ port = 8080 }",
            "{ port = 8080, methods = [\"FETCH\"] }",
            8,
            "route[0].match.methods[0]",
            "unknown method `FETCH`",
        ),
        (
            "{ port = 8080 }",
            "{ port = 8080, host = \"a b\" }",
            8,
            "route[0].match.host",
            "not a host name",
        ),
        (
            "[\"http://shadow:8080\"]",
            "[\"https://shadow:8080\"]",
            9,
            "route[0].targets[0]",
            "`http://host:port`",
        ),
        (
            "[\"http://shadow:8080\"]",
            "[\"http://shadow\"]",
            9,
            "route[0].targets[0]",
            "port is required",
        ),
        (
            "[\"http://shadow:8080\"]",
            "[\"http://shadow:8080/path\"]",
            9,
            "route[0].targets[0]",
            "without path",
        ),
        (
            "[\"http://shadow:8080\"]",
            "[\"http://user@shadow:8080\"]",
            9,
            "route[0].targets[0]",
            "without path",
        ),
        (
            "[\"http://shadow:8080\"]",
            "[\"http://shadow:0\"]",
            9,
            "route[0].targets[0]",
            "1 to 65535",
        ),
        (
            "[\"http://shadow:8080\"]",
            "[]",
            9,
            "route[0].targets",
            "at least one target",
        ),
        (
            "[\"http://shadow:8080\"]",
            "[\"http://a:1\", \"http://A:1/\"]",
            9,
            "route[0].targets[1]",
            "listed twice",
        ),
        (
            "targets = [\"http://shadow:8080\"]",
            "",
            6,
            "route[0]",
            "missing field `targets`",
        ),
        (
            "[\"http://shadow:8080\"]",
            "[\"http://shadow:8080\"]\nsample_percent = -1",
            10,
            "route[0].sample_percent",
            "between 0 and 100",
        ),
        (
            "[\"http://shadow:8080\"]",
            "[\"http://shadow:8080\"]\nallow_methods = [\"get\"]",
            10,
            "route[0].allow_methods[0]",
            "unknown method `get`",
        ),
        (
            "[\"http://shadow:8080\"]",
            "[\"http://shadow:8080\"]\nallow_methods = [\"CONNECT\"]",
            10,
            "route[0].allow_methods[0]",
            "never mirrored",
        ),
        (
            "[\"http://shadow:8080\"]",
            "[\"http://shadow:8080\"]\ndeny_paths = [\"/ok\", \"/a/[b\"]",
            10,
            "route[0].deny_paths[1]",
            "invalid glob",
        ),
        (
            "[\"http://shadow:8080\"]",
            "[\"http://shadow:8080\"]\ndeny_paths = [\"admin\"]",
            10,
            "route[0].deny_paths[0]",
            "start with `/`",
        ),
        (
            "[\"http://shadow:8080\"]",
            "[\"http://shadow:8080\"]\nhost = \"not a host\"",
            10,
            "route[0].host",
            "`preserve`, `target`",
        ),
        (
            "[\"http://shadow:8080\"]",
            "[\"http://shadow:8080\"]\nset_headers = { host = \"x\" }",
            10,
            "route[0].set_headers.host",
            "`host` key",
        ),
        (
            "[\"http://shadow:8080\"]",
            "[\"http://shadow:8080\"]\nset_headers = { \"x-a\" = \"1\\r\\nx-b: 2\" }",
            10,
            "route[0].set_headers.x-a",
            "control characters",
        ),
        (
            "[\"http://shadow:8080\"]",
            "[\"http://shadow:8080\"]\nremove_headers = [\"transfer-encoding\"]",
            10,
            "route[0].remove_headers[0]",
            "framing",
        ),
        (
            "[\"http://shadow:8080\"]",
            "[\"http://shadow:8080\"]\nremove_headers = [\"x-shadow-request\"]",
            10,
            "route[0].remove_headers[0]",
            "[tagging]",
        ),
        (
            "name = \"api\"",
            "name = \"\"",
            7,
            "route[0].name",
            "empty name",
        ),
        ("[capture]", "[captrue]", 2, "captrue", "unknown section"),
    ];
    for (from, to, line, key, message) in cases {
        assert!(MINIMAL.contains(from), "{from}");
        let src = MINIMAL.replacen(from, to, 1);
        let issues = errors(&src);
        assert!(
            issues
                .iter()
                .any(|i| i.line == *line && i.key == *key && i.message.contains(message)),
            "want {line}: `{key}`: …{message}… for `{to}`, got {issues:#?}"
        );
    }
}

#[test]
fn section_errors() {
    let cases: &[(&str, usize, &str, &str)] = &[
        (
            "[budget]\nnode_rps = 0",
            12,
            "budget.node_rps",
            "not above 0",
        ),
        (
            "[compare]\nmax_decoded_ratio = 0",
            11,
            "compare.max_decoded_ratio",
            "at least 1",
        ),
        (
            "[budget]\ntarget_bytes_per_sec = -5",
            12,
            "budget.target_bytes_per_sec",
            "not above 0",
        ),
        (
            "[budget]\nmax_in_flight = 0",
            12,
            "budget.max_in_flight",
            "not 1 to",
        ),
        (
            "[budget]\ntimeout = \"soon\"",
            12,
            "budget.timeout",
            "not a duration",
        ),
        (
            "[budget]\ntimeout = \"0s\"",
            12,
            "budget.timeout",
            "above 0",
        ),
        (
            "[budget]\ntimeout = 5",
            12,
            "budget.timeout",
            "expected a string",
        ),
        (
            "[tagging]\nheader = \"x-shadow\"",
            12,
            "tagging.header",
            "not `name: value`",
        ),
        (
            "[tagging]\nid_header = \"x id\"",
            12,
            "tagging.id_header",
            "not a header name",
        ),
        (
            "[tagging]\nid_header = \"X-Shadow-Request\"",
            12,
            "tagging.id_header",
            "distinct names",
        ),
        (
            "[tagging]\nidempotency_header = \"traceparent\"",
            12,
            "tagging.idempotency_header",
            "is taken",
        ),
        (
            "[admin]\nlisten = \"localhost\"",
            12,
            "admin.listen",
            "not an address",
        ),
        (
            "[admin]\nlisten = \"0.0.0.0:9464\"",
            12,
            "admin.listen",
            "allow_remote",
        ),
        (
            "[admin]\nlisten = \"0.0.0.0:9464\"\nallow_remote = true",
            12,
            "admin.listen",
            "set `admin.token_file`",
        ),
        (
            "[admin]\nlisten = \"[2001:db8::1]:9464\"\nallow_remote = true",
            12,
            "admin.listen",
            "show captured requests",
        ),
        (
            "[admin]\ntoken_file = \"admin-token\"",
            12,
            "admin.token_file",
            "not an absolute path",
        ),
        (
            "[limits]\nmemory = \"32MiB\"",
            12,
            "limits.memory",
            "at least 64MiB",
        ),
        (
            "[limits]\nmemory = \"1 GB\"",
            12,
            "limits.memory",
            "not a size",
        ),
        (
            "[limits]\nmemory = \"99999999999999GiB\"",
            12,
            "limits.memory",
            "not a size",
        ),
        (
            "[ramp]\nsteps = [{ percent = 10, hold = \"1m\" }, { percent = 5, hold = \"1m\" }]\nguard = { p99 = \"1s\" }",
            12,
            "ramp.steps[1].percent",
            "does not increase",
        ),
        (
            "[ramp]\nsteps = [{ percent = 150, hold = \"1m\" }]\nguard = { p99 = \"1s\" }",
            12,
            "ramp.steps[0].percent",
            "at most 100",
        ),
        (
            "[ramp]\nsteps = [{ percent = 10, hold = \"a while\" }]\nguard = { p99 = \"1s\" }",
            12,
            "ramp.steps[0].hold",
            "not a duration",
        ),
        (
            "[ramp]\nsteps = [{ percent = 10, hold = \"1m\" }]\nguard = { min_requests = 5 }",
            13,
            "ramp.guard",
            "never falls back",
        ),
        (
            "[ramp]\nsteps = [{ percent = 10, hold = \"1m\" }]",
            11,
            "ramp.guard",
            "needs a guard",
        ),
        (
            "[ramp]\nsteps = []\nguard = { p99 = \"1s\" }",
            12,
            "ramp.steps",
            "no step",
        ),
        (
            "[policy]\ndeny_paths = [\"admin\"]",
            12,
            "policy.deny_paths[0]",
            "start with `/`",
        ),
        (
            "[policy]\ndeny_paths = [\n  \"/ok\",\n  \"/a/[b\",\n]",
            14,
            "policy.deny_paths[1]",
            "invalid glob",
        ),
        (
            "[policy]\ndeny_path = [\"/admin/**\"]",
            12,
            "policy.deny_path",
            "unknown field `deny_path`",
        ),
        (
            "[policy]\ndeny_paths = \"/admin/**\"",
            12,
            "policy.deny_paths",
            "expected a sequence",
        ),
    ];
    for (section, line, key, message) in cases {
        let src = format!("{MINIMAL}\n{section}\n");
        let issues = errors(&src);
        assert!(
            issues
                .iter()
                .any(|i| i.line == *line && i.key == *key && i.message.contains(message)),
            "want {line}: `{key}`: …{message}… for `{section}`, got {issues:#?}"
        );
    }
}

#[test]
fn accepted_values() {
    let cases = [
        "[admin]\nlisten = \"0.0.0.0:9464\"\nallow_remote = true\ntoken_file = \"/etc/shadow-admin/token\"",
        "[admin]\nlisten = \"[::1]:9000\"",
        "[admin]\ntoken_file = \"/run/credentials/shadow-agent.service/admin-token\"",
        "[budget]\nnode_rps = 0.5\ntarget_bytes_per_sec = 1000\ntimeout = \"500ms\"",
        "[tagging]\nheader = \"X-Mirror:  yes \"\nbaggage = false",
        "[ramp]\nsteps = [{ percent = 1, hold = \"30s\" }, { percent = 100, hold = \"1h\" }]\nguard = { error_percent = 1 }",
        "[limits]\nmemory = \"1GiB\"",
        "[compare]\n[compare.verdict]\nmin_exchanges = 50\nmax_unexplained_share = 0.1\nmax_error_rate_increase = 0\nmax_p99_ratio = 1.5\n[ramp]\nsteps = [{ percent = 1, hold = \"30s\" }]\nguard = { error_percent = 1 }\ngate = \"verdict\"",
        "[ramp]\nsteps = [{ percent = 1, hold = \"30s\" }]\nguard = { error_percent = 1 }\ngate = \"health\"",
        "[compare]\nignore_fields = [\"$.request_id\", \"**.timestamp\"]\narray_order = \"unordered\"\nnumeric_tolerance = 0.01",
        "[compare]\nmax_decoded_ratio = 1000",
        "[limits]\nmemory = \"67108864\"",
        "[policy]",
        "[policy]\ndeny_paths = []",
    ];
    for section in cases {
        let src = format!("{MINIMAL}\n{section}\n");
        if let Err(e) = Config::from_toml(&src, "t.toml") {
            panic!("`{section}` refused: {e}");
        }
    }
    let src = format!("{MINIMAL}\n[policy]\ndeny_paths = [\"**/.env\", \"/admin/**\"]\n");
    let config = Config::from_toml(&src, "t.toml").expect("valid");
    let patterns: Vec<&str> = config
        .policy
        .deny_paths
        .iter()
        .map(|g| g.as_str())
        .collect();
    assert_eq!(patterns, ["**/.env", "/admin/**"]);
    let src = MINIMAL.replace(
        "match = { port = 8080 }",
        "match = { port = 8080, methods = [\"GET\", \"DELETE\"] }\nhost = \"orders.internal:8080\"\nallow_methods = [\"DELETE\"]",
    );
    let config = Config::from_toml(&src, "t.toml").expect("valid");
    let route = &config.routes[0];
    assert_eq!(
        route.host,
        HostRule::Literal(HeaderValue::from_static("orders.internal:8080"))
    );
    assert_eq!(
        route.matcher.methods,
        Some([Method::Get, Method::Delete].into_iter().collect())
    );
    assert_eq!(
        route.allow_methods.iter().collect::<Vec<_>>(),
        [Method::Delete]
    );
    let src = format!("{MINIMAL}\n[limits]\nmemory = \"96MiB\"\n");
    let config = Config::from_toml(&src, "t.toml").expect("valid");
    assert_eq!(config.limits.memory_bytes, 96 << 20);
    let src = format!("{MINIMAL}\n[tagging]\nheader = \"X-Mirror:  yes \"\n");
    let config = Config::from_toml(&src, "t.toml").expect("valid");
    assert_eq!(config.tagging.header.0, "x-mirror");
    assert_eq!(config.tagging.header.1, "yes");
    let src = format!(
        "{MINIMAL}\n[admin]\nlisten = \"0.0.0.0:9464\"\nallow_remote = true\ntoken_file = \"/t\"\n"
    );
    let config = Config::from_toml(&src, "t.toml").expect("valid");
    assert_eq!(
        config.admin,
        AdminConfig {
            listen: "0.0.0.0:9464".parse().expect("addr"),
            token_file: Some("/t".into()),
        }
    );
}

#[test]
fn all_errors_are_reported_in_line_order() {
    let src = r#"
[capture]
interfaces = ["eth0"]
ports = [0]
sample_percent = 300

[[route]]
name = "a"
match = { port = 8080, methods = ["GTE"] }
targets = ["ftp://x:1"]

[[route]]
name = "a"
match = { port = 8080 }
targets = ["http://x:1"]
colour = "blue"

[budget]
node_rps = -1
"#;
    let e = Config::from_toml(src, "f.toml").expect_err("invalid");
    let got: Vec<(usize, &str)> = e.issues.iter().map(|i| (i.line, i.key.as_str())).collect();
    assert_eq!(
        got,
        [
            (4, "capture.ports[0]"),
            (5, "capture.sample_percent"),
            (9, "route[0].match.methods[0]"),
            (10, "route[0].targets[0]"),
            (16, "route[1].colour"),
            (19, "budget.node_rps"),
        ]
    );
    let text = e.to_string();
    assert!(
        text.starts_with("f.toml:4: key `capture.ports[0]`: port 0 is not 1 to 65535\n"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 6);
}

#[test]
fn duplicate_route_names() {
    let src = format!(
        "{MINIMAL}\n[[route]]\nname = \"api\"\nmatch = {{ port = 8080 }}\ntargets = [\"http://b:1\"]\n"
    );
    let issues = errors(&src);
    assert_eq!(issues.len(), 1, "{issues:#?}");
    assert_eq!(
        (issues[0].line, issues[0].key.as_str()),
        (12, "route[1].name")
    );
    assert!(issues[0].message.contains("duplicate route name `api`"));
}

#[test]
fn syntax_errors_name_their_line() {
    let src = "[capture]\ninterfaces = [\"eth0\"\nports = [8080]\n";
    let issues = errors(src);
    assert!(!issues.is_empty());
    assert!(issues.iter().all(|i| i.line >= 2), "{issues:#?}");
    let src = "[capture]\nports = [8080]\nports = [9090]\n";
    let issues = errors(src);
    assert_eq!(issues[0].line, 3, "{issues:#?}");
}

#[test]
fn missing_sections() {
    let issues = errors("");
    let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["capture", "route"]);
    let issues = errors(
        "[capture]\nports = [1]\n[[route]]\nname = \"x\"\nmatch = { port = 1 }\ntargets = [\"http://a:1\"]\n",
    );
    assert_eq!(issues.len(), 1);
    assert_eq!(
        (issues[0].line, issues[0].key.as_str()),
        (1, "capture.interfaces")
    );
}

#[test]
fn targets() {
    let cases = [
        (
            "http://shadow:8080",
            Some(("shadow", 8080, "http://shadow:8080")),
        ),
        (
            "http://Shadow.Svc:80/",
            Some(("shadow.svc", 80, "http://shadow.svc:80")),
        ),
        (
            "http://10.0.0.1:1",
            Some(("10.0.0.1", 1, "http://10.0.0.1:1")),
        ),
        (
            "http://[::1]:8080",
            Some(("::1", 8080, "http://[::1]:8080")),
        ),
        (
            "h2c://orders-shadow:50051",
            Some(("orders-shadow", 50051, "h2c://orders-shadow:50051")),
        ),
        (
            "grpc://[fd00::1]:50051/",
            Some(("fd00::1", 50051, "grpc://[fd00::1]:50051")),
        ),
        ("grpc://orders", None),
        ("grpcs://orders:443", None),
        ("https://orders:443", None),
        ("h2://orders:80", None),
        ("http://[::1]", None),
        ("http://[zz]:1", None),
        ("http://:80", None),
        ("http://a:80?x", None),
        ("http://a:65536", None),
        ("HTTP://a:80", None),
        ("shadow:8080", None),
    ];
    for (url, want) in cases {
        let got = Target::parse(url).ok();
        let got = got
            .as_ref()
            .map(|t| (t.host.as_str(), t.port, t.to_string()));
        let want = want.map(|(h, p, s)| (h, p, s.to_owned()));
        assert_eq!(got, want, "{url}");
    }
}

#[test]
fn verdict_thresholds_and_the_ramp_gate() {
    // (section, line, key, message)
    let cases = [
        (
            "[compare.verdict]\nmax_unexplained_share = 1.5",
            12,
            "compare.verdict.max_unexplained_share",
            "not a share from 0 to 1",
        ),
        (
            "[compare.verdict]\nmax_error_rate_increase = -0.01",
            12,
            "compare.verdict.max_error_rate_increase",
            "not a share from 0 to 1",
        ),
        (
            "[compare.verdict]\nmax_p99_ratio = 0",
            12,
            "compare.verdict.max_p99_ratio",
            "not a ratio above 0",
        ),
        (
            "[compare.verdict]\nmin_exchange = 3",
            12,
            "compare.verdict.min_exchange",
            "unknown field",
        ),
        (
            "[ramp]\nsteps = [{ percent = 1, hold = \"30s\" }]\nguard = { error_percent = 1 }\ngate = \"canary\"",
            14,
            "ramp.gate",
            "`canary` is not a gate",
        ),
        (
            "[ramp]\nsteps = [{ percent = 1, hold = \"30s\" }]\nguard = { error_percent = 1 }\ngate = \"verdict\"",
            14,
            "ramp.gate",
            "needs a `[compare]` section",
        ),
    ];
    for (section, line, key, message) in cases {
        let src = format!("{MINIMAL}\n{section}\n");
        let issues = errors(&src);
        assert!(
            issues
                .iter()
                .any(|i| i.line == line && i.key == key && i.message.contains(message)),
            "want {line}: `{key}`: …{message}… for `{section}`, got {issues:#?}"
        );
    }
    let src = format!(
        "{MINIMAL}\n[compare.verdict]\nmin_exchanges = 7\n[ramp]\nsteps = [{{ percent = 1, hold = \"1s\" }}]\nguard = {{ p99 = \"1s\" }}\ngate = \"verdict\"\n"
    );
    let config = Config::from_toml(&src, "t.toml").expect("valid");
    let verdict = config.compare.expect("compare").verdict;
    assert_eq!(verdict.min_exchanges, 7);
    assert_eq!(verdict.max_unexplained_share.get(), 0.05, "default kept");
    assert_eq!(config.ramp.expect("ramp").gate, RampGate::Verdict);
}

const GRPC_ROUTE: &str = r#"
[capture]
interfaces = ["eth0"]
ports = [50051]

[[route]]
name = "orders"
match = { port = 50051, grpc = "shop.Orders/*" }
targets = ["grpc://orders-shadow:50051", "h2c://orders-canary:50051"]
baseline = "grpc://orders-stable:50051"
allow_grpc = ["shop.Orders/Get*", "shop.Orders/ListOrders"]
"#;

#[test]
fn grpc_routes_are_checked_at_load() {
    let config = match Config::from_toml(GRPC_ROUTE, "grpc.toml") {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let route = &config.routes[0];
    assert_eq!(
        route.matcher.grpc.as_ref().map(|g| g.as_str()),
        Some("shop.Orders/*")
    );
    let allowed: Vec<&str> = route.allow_grpc.iter().map(|g| g.as_str()).collect();
    assert_eq!(allowed, ["shop.Orders/Get*", "shop.Orders/ListOrders"]);
    assert_eq!(
        route.targets.iter().map(|t| t.scheme).collect::<Vec<_>>(),
        [TargetScheme::Grpc, TargetScheme::H2c]
    );
    // Nothing to allow: the default is no gRPC call at all.
    assert!(
        Config::from_toml(MINIMAL, "m.toml").expect("valid").routes[0]
            .allow_grpc
            .is_empty()
    );

    // (from, to, line, key, message)
    let cases: &[(&str, &str, usize, &str, &str)] = &[
        (
            "grpc = \"shop.Orders/*\"",
            "grpc = \"shop.Orders\"",
            8,
            "route[0].match.grpc",
            "expected `package.Service/Method`",
        ),
        (
            "grpc = \"shop.Orders/*\"",
            "grpc = \"/shop.Orders/Get\"",
            8,
            "route[0].match.grpc",
            "expected `package.Service/Method`",
        ),
        (
            "grpc = \"shop.Orders/*\"",
            "grpc = \"shop.Orders/[Get\"",
            8,
            "route[0].match.grpc",
            "`shop.Orders/[Get`",
        ),
        (
            "grpc = \"shop.Orders/*\"",
            "grpc = \"shop.**/Get\"",
            8,
            "route[0].match.grpc",
            "`**` spans nothing",
        ),
        (
            "\"shop.Orders/ListOrders\"]",
            "\"shop.Orders/List/Orders\"]",
            11,
            "route[0].allow_grpc[1]",
            "expected `package.Service/Method`",
        ),
        (
            "allow_grpc = [",
            "allow_grpc = [\"*\", ",
            11,
            "route[0].allow_grpc[0]",
            "expected `package.Service/Method`",
        ),
        // gRPC needs HTTP/2 at every target of a route that allows it, the baseline's too.
        (
            "\"h2c://orders-canary:50051\"",
            "\"http://orders-canary:50051\"",
            9,
            "route[0].targets[1]",
            "need an HTTP/2 target (`grpc://orders-canary:50051`",
        ),
        (
            "baseline = \"grpc://",
            "baseline = \"http://",
            10,
            "route[0].baseline",
            "need an HTTP/2 baseline",
        ),
        (
            "grpc://orders-shadow:50051\"",
            "grpcs://orders-shadow:50051\"",
            9,
            "route[0].targets[0]",
            "`grpcs://orders-shadow:50051`: targets are",
        ),
        (
            "allow_grpc = [",
            "allow_grpc = 1\nx = [",
            11,
            "route[0].allow_grpc",
            "",
        ),
    ];
    for (from, to, line, key, message) in cases {
        assert!(GRPC_ROUTE.contains(from), "{from}");
        let src = GRPC_ROUTE.replacen(from, to, 1);
        let issues = errors(&src);
        assert!(
            issues
                .iter()
                .any(|i| i.line == *line && i.key.starts_with(*key) && i.message.contains(message)),
            "want {line}: `{key}`: …{message}… for `{to}`, got {issues:#?}"
        );
    }
    // Without `allow_grpc`, an `http://` target is fine: only plain requests go there, and a
    // plain HTTP/2 request is sent to it as HTTP/1.1.
    let plain = GRPC_ROUTE
        .replace("grpc://orders-shadow", "http://orders-shadow")
        .replace(
            "allow_grpc = [\"shop.Orders/Get*\", \"shop.Orders/ListOrders\"]",
            "",
        );
    assert!(Config::from_toml(&plain, "plain.toml").is_ok());
}

/// `compare.descriptors` is read at load, relative to the file, and refused with the reason.
#[test]
fn descriptors_are_read_relative_to_the_file_and_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("shadow.toml");
    std::fs::write(
        &config,
        format!("{MINIMAL}\n[compare]\ndescriptors = \"api.pb\"\n"),
    )
    .expect("write");
    let err = Config::load(&config).expect_err("no such file");
    assert!(matches!(err, ConfigError::DescriptorsRead { .. }), "{err}");
    assert!(err.to_string().contains("compare.descriptors"), "{err}");

    std::fs::write(dir.path().join("api.pb"), b"not a descriptor set").expect("write");
    let err = Config::load(&config).expect_err("not a set");
    assert!(
        err.to_string().contains("FileDescriptorSet") && err.to_string().contains("api.pb"),
        "{err}"
    );

    let set = crate::compare::protobuf::tests::shop_descriptors();
    std::fs::write(
        dir.path().join("api.pb"),
        prost::Message::encode_to_vec(&set),
    )
    .expect("write");
    let loaded = Config::load(&config).unwrap_or_else(|e| panic!("{e}"));
    let schema = loaded.compare.and_then(|c| c.schema).expect("schema read");
    assert!(schema.method("shop.v1.Orders/Get").is_some());
}
