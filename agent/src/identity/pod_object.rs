//! A pod as the agent reads it from the Kubernetes API server: the few fields caller
//! attestation uses, parsed one object at a time.
//!
//! A list page or watch event of `k8s_openapi`'s `Pod` fails whole when any field of any pod
//! has the wrong type, so one malformed pod kept every pod of the node unattested (503
//! `PodsNotSynced`), and the page was held as whole pods. Here each object is read into a
//! JSON value first and the fields are taken from it on their own: an object whose fields do
//! not parse becomes a [`PodObject`] that says so, with its UID and resourceVersion when they
//! can be read, and the pod set counts it and refuses its tokens while the rest of the
//! list is used. Fields the agent does not read are not looked at.

use std::borrow::Cow;

use kube::core::{NamespaceResourceScope, ObjectMeta};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::defence::{self, Defence};
use crate::identity::kube_api::error_text;

/// One pod object of a list, a watch event or a GET.
#[derive(Clone, Debug)]
pub struct PodObject {
    /// Name, namespace, UID and resourceVersion, each read on its own, so that a pod whose
    /// other fields do not parse is still known by its UID, and the watcher still learns the
    /// resourceVersion it resumes from.
    metadata: ObjectMeta,
    /// The fields the agent uses, or why they do not parse (bounded text).
    pub fields: Result<PodFields, String>,
}

/// What caller attestation reads of a pod. Every field is optional, as in the API; a field
/// of the wrong type makes the whole object malformed.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodFields {
    #[serde(default)]
    pub metadata: Metadata,
    pub spec: Option<Spec>,
    pub status: Option<Status>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Metadata {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub uid: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    pub node_name: Option<String>,
    pub host_network: Option<bool>,
    pub service_account_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

impl PodObject {
    /// The UID, if the object has one that is a string.
    pub fn uid(&self) -> Option<&str> {
        self.metadata.uid.as_deref()
    }

    pub fn name(&self) -> Option<&str> {
        self.metadata.name.as_deref()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.metadata.namespace.as_deref()
    }
}

impl<'de> Deserialize<'de> for PodObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PodObject, D::Error> {
        // Only JSON that is not JSON at all fails here; the page or event is malformed then.
        let value = Value::deserialize(deserializer)?;
        let text = |key: &str| value.get("metadata")?.get(key)?.as_str().map(str::to_owned);
        let metadata = ObjectMeta {
            name: text("name"),
            namespace: text("namespace"),
            uid: text("uid"),
            resource_version: text("resourceVersion"),
            ..ObjectMeta::default()
        };
        let fields = match PodFields::deserialize(&value) {
            Ok(fields) => Ok(fields),
            // serde's message quotes the value it refused, which the server chose.
            Err(e) if defence::on(Defence::LenientPodList) => Err(error_text(&e)),
            Err(e) => return Err(serde::de::Error::custom(e)),
        };
        Ok(PodObject { metadata, fields })
    }
}

/// A core/v1 pod, for `kube::Api` and the watcher.
impl kube::Resource for PodObject {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Pod")
    }

    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("")
    }

    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }

    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("pods")
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(host_network: Value) -> Value {
        json!({
            "metadata": {"name": "a", "namespace": "ns", "uid": "u1", "resourceVersion": "7"},
            "spec": {"nodeName": "n", "hostNetwork": host_network, "serviceAccountName": "sa",
                     "containers": [{"name": "app", "image": 5}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]},
        })
    }

    #[test]
    fn the_fields_the_agent_uses_are_read_and_the_rest_ignored() {
        let object: PodObject = serde_json::from_value(pod(json!(true))).unwrap();
        let fields = object.fields.as_ref().unwrap();
        let spec = fields.spec.as_ref().unwrap();
        assert_eq!(spec.host_network, Some(true));
        assert_eq!(spec.service_account_name.as_deref(), Some("sa"));
        assert_eq!(
            fields.status.as_ref().unwrap().pod_ips.as_ref().unwrap()[0].ip,
            "10.0.0.1"
        );
        assert_eq!(object.uid(), Some("u1"));
        assert_eq!(
            kube::ResourceExt::resource_version(&object).as_deref(),
            Some("7")
        );
    }

    #[test]
    fn a_malformed_pod_is_one_item_of_its_list_and_keeps_its_uid() {
        let list = json!({
            "kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "9"},
            "items": [pod(json!(true)), pod(json!("yes")), pod(json!(false))],
        });
        let list: kube::core::ObjectList<PodObject> = serde_json::from_value(list).unwrap();
        let parsed: Vec<bool> = list.items.iter().map(|p| p.fields.is_ok()).collect();
        assert_eq!(parsed, [true, false, true]);
        let bad = &list.items[1];
        assert_eq!(bad.uid(), Some("u1"));
        assert!(
            bad.fields.as_ref().unwrap_err().contains("yes"),
            "{:?}",
            bad.fields
        );
    }

    #[test]
    fn a_refused_value_is_quoted_bounded() {
        let object: PodObject = serde_json::from_value(pod(json!("y".repeat(100_000)))).unwrap();
        assert!(object.fields.unwrap_err().len() < 1000);
    }
}
