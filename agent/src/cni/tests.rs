//! The plugin's input and output handling, without root or an agent: what the runtime
//! sends is validated with the right CNI code, and what is printed is what the spec says.

use std::{collections::HashMap, net::Ipv4Addr, path::PathBuf, time::Duration};

use super::{
    Command, Environment, ErrorCode, NetConf,
    plugin::from_client,
    result::{Attachment, CniResult},
    run,
};
use crate::{api::ClientError, ipam::AllocError};

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name| map.get(name).cloned()
}

const ADD_ENV: &[(&str, &str)] = &[
    ("CNI_COMMAND", "ADD"),
    ("CNI_CONTAINERID", "abc123"),
    ("CNI_NETNS", "/run/netns/pod"),
    ("CNI_IFNAME", "eth0"),
    (
        "CNI_ARGS",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_INFRA_CONTAINER_ID=abc123",
    ),
];

#[test]
fn environment_gives_the_pod_ref() {
    let env = Environment::from_vars(vars(ADD_ENV)).expect("valid environment");
    assert_eq!(env.command, Command::Add);
    assert_eq!(env.netns, Some(PathBuf::from("/run/netns/pod")));
    let pod = env.pod_ref();
    assert_eq!(pod.container_id, "abc123");
    assert_eq!(pod.ifname, "eth0");
    assert_eq!(pod.namespace.as_deref(), Some("shop"));
    assert_eq!(pod.name.as_deref(), Some("cart-0"));
}

#[test]
fn invalid_environment_is_code_4_naming_the_variable() {
    let without = |name: &str| -> Vec<(&str, &str)> {
        ADD_ENV
            .iter()
            .copied()
            .filter(|(k, _)| *k != name)
            .collect()
    };
    for missing in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"] {
        let error = Environment::from_vars(vars(&without(missing))).unwrap_err();
        assert_eq!(
            error.code,
            ErrorCode::InvalidEnvironment,
            "{missing}: {error}"
        );
        assert!(error.msg.contains(missing), "{missing} not named: {error}");
    }
    let mut bad_args = without("CNI_ARGS");
    bad_args.push(("CNI_ARGS", "K8S_POD_NAME"));
    assert_eq!(
        Environment::from_vars(vars(&bad_args)).unwrap_err().code,
        ErrorCode::InvalidEnvironment
    );
    // DEL may come without a netns; VERSION needs nothing but the command.
    let mut del = without("CNI_NETNS");
    del[0] = ("CNI_COMMAND", "DEL");
    assert!(Environment::from_vars(vars(&del)).is_ok());
    assert!(Environment::from_vars(vars(&[("CNI_COMMAND", "VERSION")])).is_ok());
}

#[test]
fn configuration_errors_have_the_spec_codes() {
    let code = |text: &str| NetConf::parse(text.as_bytes()).unwrap_err().code;
    assert_eq!(code("{not json"), ErrorCode::Decode);
    assert_eq!(
        code(r#"{"name":"n","type":"vcnpath-cni"}"#),
        ErrorCode::InvalidConfig
    );
    assert_eq!(
        code(r#"{"cniVersion":"1.0.0","type":"vcnpath-cni"}"#),
        ErrorCode::InvalidConfig
    );
    assert_eq!(
        code(r#"{"cniVersion":"2.0.0","name":"n","type":"vcnpath-cni"}"#),
        ErrorCode::IncompatibleVersion
    );
    assert_eq!(
        code(r#"{"cniVersion":"1.0.0","name":"n","type":"vcnpath-cni","mtu":20}"#),
        ErrorCode::UnsupportedField
    );
}

#[test]
fn a_plugin_entry_of_the_shipped_conflist_is_accepted() {
    let conflist: serde_json::Value =
        serde_json::from_str(include_str!("../../../deploy/10-vcnpath.conflist"))
            .expect("deploy/10-vcnpath.conflist is JSON");
    // The runtime hands each plugin its entry with the list's name and version added.
    let mut entry = conflist["plugins"][0].clone();
    entry["cniVersion"] = conflist["cniVersion"].clone();
    entry["name"] = conflist["name"].clone();
    entry["prevResult"] = serde_json::json!({"cniVersion": "1.0.0", "ips": []});
    let conf = NetConf::parse(entry.to_string().as_bytes()).expect("conflist entry");
    assert_eq!(conf.cni_version, "1.0.0");
    assert_eq!(conf.socket(), PathBuf::from(crate::api::DEFAULT_SOCKET));
    assert_eq!(conf.mtu, Some(9000));
    assert_eq!(conf.timeout(), Duration::from_secs(10));
}

#[test]
fn results_follow_the_requested_version() {
    let attachment = Attachment {
        host_veth: "vcn0123456789ab",
        host_mac: [0xaa, 0xbb, 0xcc, 0, 1, 2],
        ifname: "eth0",
        pod_mac: [2, 0, 0, 0, 0, 1],
        netns: "/run/netns/pod",
        ip: Ipv4Addr::new(10, 0, 1, 7),
    };
    let current =
        serde_json::to_value(CniResult::for_attachment("1.0.0", false, &attachment)).unwrap();
    assert_eq!(
        current,
        serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "vcn0123456789ab", "mac": "aa:bb:cc:00:01:02"},
                {"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/run/netns/pod"}
            ],
            "ips": [{"address": "10.0.1.7/32", "gateway": "169.254.1.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
            "dns": {}
        })
    );
    let legacy =
        serde_json::to_value(CniResult::for_attachment("0.4.0", true, &attachment)).unwrap();
    assert_eq!(legacy["ips"][0]["version"], "4");
}

#[test]
fn agent_answers_map_to_cni_codes() {
    let code = |e: ClientError| from_client(&e).code;
    let not_running = ClientError::NotRunning {
        socket: "/run/vcnpath/vcnpath.sock".into(),
        source: std::io::ErrorKind::NotFound.into(),
    };
    let cni = from_client(&not_running);
    assert_eq!(cni.code, ErrorCode::TryAgainLater);
    assert!(cni.msg.contains("DaemonSet"), "{cni}");
    assert_eq!(
        code(ClientError::Agent(AllocError::PoolEmpty {
            retry_after_ms: 1,
            cause: None,
        })),
        ErrorCode::TryAgainLater
    );
    assert_eq!(
        code(ClientError::Agent(AllocError::NotReady)),
        ErrorCode::TryAgainLater
    );
    assert_eq!(
        code(ClientError::Agent(AllocError::Exhausted { capacity: 62 })),
        ErrorCode::AgentRefused
    );
    assert_eq!(
        code(ClientError::Agent(AllocError::Invalid {
            reason: "x".into()
        })),
        ErrorCode::InvalidEnvironment
    );
}

#[tokio::test]
async fn errors_are_cni_json_in_the_configured_version() {
    let outcome = run(
        vars(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")]),
        Ok(b"{}".to_vec()),
    )
    .await;
    assert_eq!(outcome.exit_code, 1);
    let json: serde_json::Value = serde_json::from_str(&outcome.stdout).unwrap();
    assert_eq!(json["code"], 4, "{json}");
    assert_eq!(json["cniVersion"], "1.0.0", "{json}");
    assert!(json["details"].is_string(), "{json}");

    let unreadable = run(vars(ADD_ENV), Err(std::io::ErrorKind::BrokenPipe.into())).await;
    let json: serde_json::Value = serde_json::from_str(&unreadable.stdout).unwrap();
    assert_eq!(json["code"], 5, "{json}");

    let version = run(vars(&[("CNI_COMMAND", "VERSION")]), Ok(Vec::new())).await;
    assert_eq!(version.exit_code, 0);
    let json: serde_json::Value = serde_json::from_str(&version.stdout).unwrap();
    assert_eq!(json["cniVersion"], "1.0.0");
    assert!(
        json["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&"0.4.0".into())
    );
}
