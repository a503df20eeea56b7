//! Arbitrary requests against a policy with gRPC routes: deciding never panics, and whatever
//! the method, target and content-type, a gRPC call is mirrored only when its target is exactly
//! `/Service/Method` and an `allow_grpc` glob of the deciding route names that call, never a
//! path a deny rule holds; a request that is no gRPC call is mirrored only with a method its
//! route allows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shadow_agent::config::Config;
use shadow_agent::policy::grpc::{call_name, is_grpc_call};
use shadow_agent::policy::path::RequestPath;
use shadow_agent::policy::{Decision, Policy, RequestView};

const CONFIG: &str = r#"
[capture]
interfaces = ["eth0"]
ports = [50051]

[policy]
deny_paths = ["/shop.Admin/**"]

[[route]]
name = "orders"
match = { port = 50051, grpc = "shop.Orders/*" }
targets = ["grpc://orders-shadow:50051"]
allow_grpc = ["shop.Orders/Get*", "shop.Orders/List?"]

[[route]]
name = "rest"
match = { port = 50051 }
targets = ["h2c://rest-shadow:50051"]
allow_methods = ["GET", "POST"]
allow_grpc = ["shop.Admin/*", "*/Check"]
"#;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    // method \n target \n content-type
    let mut parts = text.splitn(3, '\n');
    let (Some(method), Some(target), Some(content_type)) = (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let Ok(config) = Config::from_toml(CONFIG, "fuzz.toml") else {
        panic!("the fuzz configuration loads");
    };
    let policy = Policy::from_config(&config, 1);
    let headers = vec![("content-type".to_owned(), content_type.as_bytes().to_vec())];
    let view = RequestView {
        port: 50051,
        method,
        target,
        host: None,
        sample_key: 0,
        headers: &headers,
        server: None,
    };
    let Decision::Mirror { route, path, .. } = policy.decide(&view) else {
        return;
    };
    assert!(!policy.denies(&path), "{text:?}");
    assert_eq!(RequestPath::of_target(target).as_ref(), Ok(&path), "{text:?}");
    let Some(route) = policy.route(route) else {
        panic!("a mirrored request has its route");
    };
    if is_grpc_call(&headers) {
        let Some(name) = call_name(target) else {
            panic!("a gRPC call without a name was mirrored: {text:?}");
        };
        assert_eq!(format!("/{name}"), target);
        assert!(
            route.config().allow_grpc.iter().any(|g| g.matches(name)),
            "{text:?} mirrored by {}",
            route.name()
        );
    } else {
        assert!(
            route.config().allow_methods.contains_name(method),
            "{text:?} mirrored by {}",
            route.name()
        );
    }
});
