//! `/certs` in Envoy's `envoy.admin.v3.Certificates` shape, from the SDS secrets: one entry per TLS
//! context the listeners and clusters configure (its validation context's CA certificates and its
//! certificate's leaf), or, before any listener names one, one per certificate secret. No key
//! material is ever printed.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value as Json;
use waypoint_proto::{
    envoy::{
        admin::v3::{
            Certificate, CertificateDetails, Certificates, SubjectAlternateName,
            subject_alternate_name,
        },
        config::core::v3::{DataSource, data_source::Specifier},
        extensions::transport_sockets::tls::v3::{Secret, secret},
    },
    google::protobuf::Timestamp,
};
use waypoint_shared::pem;

use super::{Admin, proto_json_all_fields};
use crate::xds::sds::{SecretStore, data_source_bytes};

const DAY_SECS: i64 = 24 * 3600;

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

fn path_of(ds: &DataSource) -> String {
    match &ds.specifier {
        Some(Specifier::Filename(f)) => f.clone(),
        _ => "<inline>".to_owned(),
    }
}

/// Details of every certificate in a PEM data source (`leaf_only`: the first one).
fn details(ds: &DataSource, leaf_only: bool) -> Vec<CertificateDetails> {
    let Ok(bytes) = data_source_bytes(ds) else {
        return Vec::new();
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return Vec::new();
    };
    let Ok(certs) = pem::certs(text) else {
        return Vec::new();
    };
    let now = now_secs();
    certs
        .iter()
        .take(if leaf_only { 1 } else { usize::MAX })
        .filter_map(|der| pem::cert_info(der).ok())
        .map(|info| CertificateDetails {
            path: path_of(ds),
            serial_number: info.serial.clone(),
            subject_alt_names: info
                .uri_sans
                .iter()
                .map(|u| SubjectAlternateName {
                    name: Some(subject_alternate_name::Name::Uri(u.clone())),
                })
                .collect(),
            days_until_expiration: u64::try_from((info.not_after - now).max(0) / DAY_SECS)
                .unwrap_or_default(),
            valid_from: Some(Timestamp {
                seconds: info.not_before,
                nanos: 0,
            }),
            expiration_time: Some(Timestamp {
                seconds: info.not_after,
                nanos: 0,
            }),
            ocsp_details: None,
        })
        .collect()
}

fn ca_details(secret: Option<&Secret>) -> Vec<CertificateDetails> {
    match secret.and_then(|s| s.r#type.as_ref()) {
        Some(secret::Type::ValidationContext(v)) => v
            .trusted_ca
            .as_ref()
            .map(|ca| details(ca, false))
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn chain_details(secret: Option<&Secret>) -> Vec<CertificateDetails> {
    match secret.and_then(|s| s.r#type.as_ref()) {
        Some(secret::Type::TlsCertificate(t)) => t
            .certificate_chain
            .as_ref()
            .map(|c| details(c, true))
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The `/certs` proto.
pub fn certificates(admin: &Admin) -> Certificates {
    let store = &admin.secrets;
    let contexts = store.contexts();
    let mut out = Vec::new();
    for ctx in contexts.iter() {
        let ca_cert = ca_details(
            ctx.validation
                .as_ref()
                .and_then(|v| store.get(&v.name))
                .as_deref(),
        );
        let cert_chain: Vec<CertificateDetails> = ctx
            .certificates
            .iter()
            .flat_map(|c| chain_details(store.get(&c.name).as_deref()))
            .collect();
        if ca_cert.is_empty() && cert_chain.is_empty() {
            continue;
        }
        out.push(Certificate {
            ca_cert,
            cert_chain,
        });
    }
    if out.is_empty() {
        // No listener or cluster names a secret yet: one entry per certificate secret, with every
        // validation context's CAs.
        let entries = store.entries();
        let cas: Vec<CertificateDetails> = entries
            .values()
            .flat_map(|e| ca_details(e.secret.as_deref()))
            .collect();
        for e in entries.values() {
            let chain = chain_details(e.secret.as_deref());
            if !chain.is_empty() {
                out.push(Certificate {
                    ca_cert: cas.clone(),
                    cert_chain: chain,
                });
            }
        }
        if out.is_empty() && !cas.is_empty() {
            out.push(Certificate {
                ca_cert: cas,
                cert_chain: Vec::new(),
            });
        }
    }
    Certificates { certificates: out }
}

/// `/certs` as JSON (every primitive printed, as Envoy).
pub fn render(admin: &Admin) -> Json {
    proto_json_all_fields(&certificates(admin))
}

/// `server.days_until_first_cert_expiring`: the fewest days left among the held certificates.
pub fn days_until_first_expiring(store: &SecretStore) -> Option<u64> {
    store
        .entries()
        .values()
        .flat_map(|e| {
            let s = e.secret.as_deref();
            let mut all = chain_details(s);
            all.extend(ca_details(s));
            all
        })
        .map(|d| d.days_until_expiration)
        .min()
}
