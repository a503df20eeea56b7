//! The objects the stand-in API server serves, in the API's JSON form: Pods, DaemonSets,
//! `Status` failures and bookmarks, shaped as the recordings in `tests/fixtures/kube/` show.
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::TestPod;

/// The image every test pod and DaemonSet runs (never pulled: only its name is served).
const IMAGE: &str = "registry.k8s.io/pause:3.10";
/// The annotation of the bookmark that ends a watch's initial events, and the list it stands
/// for (`{"kind":"PodList","apiVersion":"v1","metadata":{},"items":null}`, base64), as recorded.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";
const INITIAL_EVENTS_BLUEPRINT: (&str, &str) = (
    "kubernetes.io/initial-events-list-blueprint",
    "eyJraW5kIjoiUG9kTGlzdCIsImFwaVZlcnNpb24iOiJ2MSIsIm1ldGFkYXRhIjp7fSwiaXRlbXMiOm51bGx9Cg==",
);

/// The Pod the API would hold for `pod`, without `kind`/`apiVersion` and with an empty
/// `resourceVersion` (the store sets it). Every time in it is its creation time, so that
/// applying the same pod again changes nothing.
pub(super) fn pod_object(pod: &TestPod, pod_uid: &str, created: &str) -> Value {
    let mut metadata = json!({
        "name": pod.name,
        "namespace": pod.namespace,
        "uid": pod_uid,
        "resourceVersion": "",
        "generation": 1,
        "creationTimestamp": created,
    });
    if !pod.labels.is_empty() {
        metadata["labels"] = pod
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    if let Some((kind, owner)) = &pod.owner {
        let prefix = format!("{owner}-");
        if pod.name.starts_with(&prefix) {
            metadata["generateName"] = prefix.into();
        }
        metadata["ownerReferences"] = json!([{
            "apiVersion": owner_api_version(kind),
            "kind": kind,
            "name": owner,
            "uid": uid(&format!("{kind}/{}/{owner}", pod.namespace)),
            "controller": true,
            "blockOwnerDeletion": true,
        }]);
    }
    let mut container = json!({
        "name": "app",
        "image": IMAGE,
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    });
    if !pod.ports.is_empty() {
        container["ports"] = pod
            .ports
            .iter()
            .map(|(name, port)| {
                let mut p = json!({"containerPort": port, "protocol": "TCP"});
                if !name.is_empty() {
                    p["name"] = name.as_str().into();
                }
                p
            })
            .collect();
    }
    let mut spec = json!({
        "containers": [container],
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": if pod.host_network { "ClusterFirstWithHostNet" } else { "ClusterFirst" },
        "serviceAccountName": "default",
        "serviceAccount": "default",
        "nodeName": pod.node,
        "securityContext": {},
        "schedulerName": "default-scheduler",
        "priority": 0,
        "enableServiceLinks": true,
        "preemptionPolicy": "PreemptLowerPriority",
    });
    if pod.host_network {
        spec["hostNetwork"] = true.into();
    }
    let running = pod.phase == "Running";
    let condition = |kind: &str, ok: bool| {
        json!({
            "type": kind,
            "status": if ok { "True" } else { "False" },
            "lastProbeTime": null,
            "lastTransitionTime": created,
        })
    };
    let mut status = json!({
        "phase": pod.phase,
        "conditions": [
            condition("PodReadyToStartContainers", running),
            condition("Initialized", true),
            condition("Ready", running),
            condition("ContainersReady", running),
            condition("PodScheduled", true),
        ],
        "qosClass": "BestEffort",
    });
    let host_ip = pod.host_ip.or(if pod.host_network { pod.ip } else { None });
    if let Some(ip) = host_ip {
        status["hostIP"] = ip.to_string().into();
        status["hostIPs"] = json!([{"ip": ip.to_string()}]);
    }
    if let Some(ip) = pod.ip {
        status["podIP"] = ip.to_string().into();
        status["podIPs"] = json!([{"ip": ip.to_string()}]);
    }
    if pod.phase != "Pending" {
        status["startTime"] = created.into();
    }
    if running {
        status["containerStatuses"] = json!([{
            "name": "app",
            "state": {"running": {"startedAt": created}},
            "lastState": {},
            "ready": true,
            "restartCount": 0,
            "image": IMAGE,
            "imageID": format!("sha256:{}", digest(IMAGE)),
            "containerID": format!("containerd://{}", digest(pod_uid)),
            "started": true,
        }]);
    }
    json!({"metadata": metadata, "spec": spec, "status": status})
}

/// The group/version of the kinds that own pods.
fn owner_api_version(kind: &str) -> &'static str {
    match kind {
        "ReplicaSet" | "Deployment" | "StatefulSet" | "DaemonSet" => "apps/v1",
        "Job" | "CronJob" => "batch/v1",
        _ => "v1",
    }
}

/// A uid (a version 4 UUID in form) made from `seed`: the same seed, the same uid.
pub(super) fn uid(seed: &str) -> String {
    let a = fnv1a(seed.as_bytes());
    let b = fnv1a(&a.to_be_bytes());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

/// 64 hex digits made from `seed`, as a sha256 digest is written.
fn digest(seed: &str) -> String {
    let mut hash = fnv1a(seed.as_bytes());
    (0..4)
        .map(|_| {
            hash = fnv1a(&hash.to_be_bytes());
            format!("{hash:016x}")
        })
        .collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub(super) fn daemonset_object(
    namespace: &str,
    name: &str,
    uid: &str,
    created: &str,
    rv: u64,
    number_ready: u32,
    desired: u32,
) -> Value {
    let labels = json!({ "app": name });
    let mut status = json!({
        "currentNumberScheduled": desired,
        "numberMisscheduled": 0,
        "desiredNumberScheduled": desired,
        "numberReady": number_ready,
        "observedGeneration": 1,
        "updatedNumberScheduled": desired,
    });
    // Zero counts are left out, as the API's omitempty leaves them.
    if number_ready > 0 {
        status["numberAvailable"] = number_ready.into();
    }
    if desired > number_ready {
        status["numberUnavailable"] = (desired - number_ready).into();
    }
    json!({
        "kind": "DaemonSet",
        "apiVersion": "apps/v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "resourceVersion": rv.to_string(),
            "generation": 1,
            "creationTimestamp": created,
            "labels": labels,
            "annotations": {"deprecated.daemonset.template.generation": "1"},
        },
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [{
                        "name": "app",
                        "image": IMAGE,
                        "resources": {},
                        "terminationMessagePath": "/dev/termination-log",
                        "terminationMessagePolicy": "File",
                        "imagePullPolicy": "IfNotPresent",
                    }],
                    "restartPolicy": "Always",
                    "terminationGracePeriodSeconds": 30,
                    "dnsPolicy": "ClusterFirst",
                    "securityContext": {},
                    "schedulerName": "default-scheduler",
                },
            },
            "updateStrategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
            },
            "revisionHistoryLimit": 10,
        },
        "status": status,
    })
}

/// `object` with `kind` and `apiVersion`, as a watch event or a single GET carries it.
pub(super) fn with_kind(object: &Value, kind: &str, api_version: &str) -> Value {
    let mut object = object.clone();
    object["kind"] = kind.into();
    object["apiVersion"] = api_version.into();
    object
}

/// A failure `Status`, the body of every error the API returns.
pub(super) fn failure(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// `404 NotFound` for a named object, with the details the real server gives.
pub(super) fn not_found(resource: &str, group: &str, name: &str) -> Value {
    let what = if group.is_empty() {
        resource.to_owned()
    } else {
        format!("{resource}.{group}")
    };
    let mut status = failure(404, "NotFound", &format!("{what} \"{name}\" not found"));
    status["details"] = json!({"name": name, "kind": resource});
    if !group.is_empty() {
        status["details"]["group"] = group.into();
    }
    status
}

/// `410 Gone` with reason `Expired`.
pub(super) fn expired(message: &str) -> Value {
    failure(410, "Expired", message)
}

pub(super) fn bad_request(message: &str) -> Value {
    failure(400, "BadRequest", message)
}

/// A `BOOKMARK`'s object as recorded: a Pod with only a version (and annotations, when it ends
/// the initial events).
pub(super) fn bookmark(rv: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_events_end {
        metadata["annotations"] = json!({
            INITIAL_EVENTS_END: "true",
            INITIAL_EVENTS_BLUEPRINT.0: INITIAL_EVENTS_BLUEPRINT.1,
        });
    }
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": metadata,
        "spec": {"containers": null},
        "status": {},
    })
}

/// `t` as the API writes times: RFC 3339, UTC, whole seconds.
pub(super) fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, day) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm), in the proleptic Gregorian calendar.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        day / 3600,
        day % 3600 / 60,
        day % 60
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_781_496_891);
        assert_eq!(rfc3339(t), "2026-06-15T04:14:51Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }
}
