//! host/openapi.json against the code: its paths and methods are exactly
//! the router's routes (`routes::routes`), every `$ref` resolves, every
//! schema is used, and the JSON of every API type and event kind (the
//! golden samples) is valid against the schema the document names for it.
//! The validator covers the part of JSON Schema the document uses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::routes::routes;
use super::types::ApiErrorCode;

const DOC: &str = include_str!("../../openapi.json");

fn doc() -> Value {
    serde_json::from_str(DOC).expect("host/openapi.json is JSON")
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc.pointer(&format!("/components/schemas/{name}"))
        .unwrap_or_else(|| panic!("no schema {name} in host/openapi.json"))
}

#[test]
fn every_route_is_documented_and_every_documented_route_exists() {
    let doc = doc();
    let served: BTreeSet<(String, String)> = routes()
        .table()
        .iter()
        .map(|(verb, path)| (path.to_string(), verb.as_str().to_string()))
        .collect();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((path.clone(), method.clone()));
        }
    }
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "routes missing from openapi.json: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "openapi.json documents no such route: {extra:?}"
    );
}

fn refs(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.insert(r.clone());
            }
            m.values().for_each(|x| refs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[test]
fn every_ref_resolves_and_every_schema_is_used() {
    let doc = doc();
    let mut used = BTreeSet::new();
    refs(&doc, &mut used);
    for r in &used {
        let name = r.strip_prefix("#/components/schemas/").unwrap();
        schema(&doc, name);
    }
    for name in doc["components"]["schemas"].as_object().unwrap().keys() {
        let r = format!("#/components/schemas/{name}");
        assert!(used.contains(&r), "schema {name} is not used");
    }
    let codes: Vec<&str> = ApiErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(schema(&doc, "ApiErrorCode")["enum"], json!(codes));
}

#[test]
fn the_types_json_is_valid_against_the_document() {
    let doc = doc();
    let mut samples: Vec<(&str, Value)> = super::types::golden::samples()
        .into_iter()
        .map(|(name, got, _)| (name, got))
        .collect();
    for (i, (event, _)) in crate::state::events::golden::samples()
        .into_iter()
        .enumerate()
    {
        let line = crate::state::events::Recorded {
            seq: i as u64 + 1,
            at_ms: 1,
            event,
        };
        samples.push(("EventLine", serde_json::to_value(line).unwrap()));
    }
    for (name, v) in samples {
        let r = json!({"$ref": format!("#/components/schemas/{name}")});
        if let Err(e) = check(&doc, &r, &v) {
            panic!("{name} {v} does not match openapi.json: {e}");
        }
    }
}

/// Validates `v` against `s` (`$ref`, `type`, `enum`, `const`, `oneOf`,
/// `properties`, `required`, `additionalProperties`, `items`, `minimum`).
fn check(doc: &Value, s: &Value, v: &Value) -> Result<(), String> {
    if let Some(r) = s["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        return check(doc, schema(doc, name), v);
    }
    if let Some(one) = s["oneOf"].as_array() {
        let n = one.iter().filter(|x| check(doc, x, v).is_ok()).count();
        return if n == 1 {
            Ok(())
        } else {
            Err(format!("{n} of oneOf match"))
        };
    }
    check_type(s, v)?;
    if let Some(e) = s["enum"].as_array()
        && !e.contains(v)
    {
        return Err(format!("{v} is not one of {e:?}"));
    }
    if !s["const"].is_null() && s["const"] != *v {
        return Err(format!("{v} is not {}", s["const"]));
    }
    if let (Some(min), Some(x)) = (s["minimum"].as_f64(), v.as_f64())
        && x < min
    {
        return Err(format!("{v} is below the minimum"));
    }
    match v {
        Value::Object(m) => check_object(doc, s, m),
        Value::Array(a) if s["items"].is_object() => a
            .iter()
            .try_for_each(|x| check(doc, &s["items"], x).map_err(|e| format!("[]: {e}"))),
        _ => Ok(()),
    }
}

fn check_type(s: &Value, v: &Value) -> Result<(), String> {
    let is = |t: &str| match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_u64() || v.is_i64(),
        "number" => v.is_number(),
        "string" => v.is_string(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    };
    let ok = match &s["type"] {
        Value::Null => true,
        Value::String(t) => is(t),
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).any(is),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{v} is not of type {}", s["type"]))
    }
}

fn check_object(doc: &Value, s: &Value, m: &Map<String, Value>) -> Result<(), String> {
    for k in s["required"].as_array().into_iter().flatten() {
        let k = k.as_str().unwrap_or_default();
        if !m.contains_key(k) {
            return Err(format!("required {k} is missing"));
        }
    }
    for (k, x) in m {
        match s["properties"].get(k) {
            Some(p) => check(doc, p, x),
            None if s["additionalProperties"] == Value::Bool(false) => {
                Err(format!("{k} is not a documented property"))
            }
            None if s["additionalProperties"].is_object() => {
                check(doc, &s["additionalProperties"], x)
            }
            None => Ok(()),
        }
        .map_err(|e| format!("{k}: {e}"))?;
    }
    Ok(())
}
