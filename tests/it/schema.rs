//! Validates JSON against `docs/error.schema.json`, interpreting the subset of JSON Schema that
//! file uses (type, required, properties, enum, minimum, maximum, minLength). An unsupported
//! keyword in the schema fails the test, so the schema cannot silently outgrow the check.

use std::sync::OnceLock;

use serde_json::Value;

fn schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/error.schema.json"
        ))
        .unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

pub fn assert_valid(v: &Value) {
    if let Err(e) = check(schema(), v, "$") {
        panic!("error body violates docs/error.schema.json: {e}\nbody: {v}");
    }
}

pub fn validate(v: &Value) -> Result<(), String> {
    check(schema(), v, "$")
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "null" => v.is_null(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "array" => v.is_array(),
        other => panic!("schema uses unsupported type {other}"),
    }
}

fn check(s: &Value, v: &Value, at: &str) -> Result<(), String> {
    let Some(obj) = s.as_object() else {
        return Ok(());
    };
    for (k, rule) in obj {
        match k.as_str() {
            "$schema" | "$id" | "title" | "description" | "additionalProperties" => {}
            "type" => {
                let ok = match rule {
                    Value::String(t) => type_ok(t, v),
                    Value::Array(ts) => ts.iter().any(|t| type_ok(t.as_str().unwrap_or(""), v)),
                    _ => false,
                };
                if !ok {
                    return Err(format!("{at}: expected type {rule}, got {v}"));
                }
            }
            "required" => {
                for r in rule.as_array().unwrap() {
                    let name = r.as_str().unwrap();
                    if v.get(name).is_none() {
                        return Err(format!("{at}: missing required member {name}"));
                    }
                }
            }
            "properties" => {
                for (name, sub) in rule.as_object().unwrap() {
                    if let Some(child) = v.get(name) {
                        check(sub, child, &format!("{at}.{name}"))?;
                    }
                }
            }
            "enum" => {
                if !rule.as_array().unwrap().contains(v) {
                    return Err(format!("{at}: {v} is not one of {rule}"));
                }
            }
            "minimum" => {
                if v.as_f64().is_some_and(|x| x < rule.as_f64().unwrap()) {
                    return Err(format!("{at}: {v} below {rule}"));
                }
            }
            "maximum" => {
                if v.as_f64().is_some_and(|x| x > rule.as_f64().unwrap()) {
                    return Err(format!("{at}: {v} above {rule}"));
                }
            }
            "minLength" => {
                if v.as_str()
                    .is_some_and(|x| (x.chars().count() as u64) < rule.as_u64().unwrap())
                {
                    return Err(format!("{at}: {v} shorter than {rule}"));
                }
            }
            other => panic!("schema uses unsupported keyword {other}"),
        }
    }
    Ok(())
}

#[test]
fn the_validator_rejects_what_the_schema_forbids() {
    let good: Value = serde_json::json!({"error": {"message": "m", "type": "bad_request", "code": null, "param": null, "status": 400, "source": "gateway", "request_id": "r"}});
    assert!(validate(&good).is_ok());
    for broken in [
        serde_json::json!({"detail": "x"}),
        serde_json::json!({"error": {"message": "m", "type": "oops", "code": null, "param": null, "status": 400, "source": "gateway", "request_id": "r"}}),
        serde_json::json!({"error": {"message": "m", "type": "bad_request", "param": null, "status": 400, "source": "gateway", "request_id": "r"}}),
        serde_json::json!({"error": {"message": "", "type": "bad_request", "code": null, "param": null, "status": 400, "source": "gateway", "request_id": "r"}}),
        serde_json::json!({"error": {"message": "m", "type": "bad_request", "code": null, "param": null, "status": 200, "source": "gateway", "request_id": "r"}}),
        serde_json::json!({"error": {"message": "m", "type": "bad_request", "code": null, "param": null, "status": 400, "source": "me", "request_id": "r"}}),
    ] {
        assert!(validate(&broken).is_err(), "{broken}");
    }
}
