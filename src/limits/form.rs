//! The `model` field of a `multipart/form-data` request body (audio transcriptions and
//! translations, image edits and variations send their file and their model this way), for
//! the model allow-lists and model policies. The part headers are parsed by httparse
//! (hyper's own header parser).

/// The value of the one `model` field of a multipart body; `None` when the body is not
/// multipart/form-data with exactly one `model` field of UTF-8 text, or holds a part the
/// upstream might read as the model differently (a `Model` field, two `Content-Disposition`
/// headers in one part, a disposition that gives a parameter twice or as `name*`, a content
/// type with two boundaries).
pub fn model(content_type: Option<&[u8]>, body: &[u8]) -> Option<String> {
    let boundary = boundary(content_type?)?;
    let mut delimiter = Vec::with_capacity(boundary.len() + 4);
    delimiter.extend_from_slice(b"\r\n--");
    delimiter.extend_from_slice(boundary);
    // The first delimiter may start the body, without the line break before it.
    let body_start = body.strip_prefix(&delimiter[2..])?;
    let finder = memchr::memmem::Finder::new(&delimiter);
    let mut found = None;
    let mut rest = body_start;
    loop {
        // After a delimiter: `--` ends the body, a line break starts a part.
        if rest.starts_with(b"--") {
            return found;
        }
        rest = rest.strip_prefix(b"\r\n")?;
        let end = finder.find(rest)?;
        let part = &rest[..end];
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let httparse::Status::Complete((head_len, headers)) =
            httparse::parse_headers(part, &mut headers).ok()?
        else {
            return None;
        };
        let mut dispositions = headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("content-disposition"));
        let disposition = match (dispositions.next(), dispositions.next()) {
            (Some(d), None) => Some(d.value),
            (None, _) => None,
            (Some(_), Some(_)) => return None,
        };
        let name = match disposition.map(field_name) {
            Some(Err(Ambiguous)) => return None,
            Some(Ok(name)) => name,
            None => None,
        };
        let is_model = name == Some(&b"model"[..]);
        if !is_model && name.is_some_and(|n| n.eq_ignore_ascii_case(b"model")) {
            return None;
        }
        if is_model {
            // A file, or a value some parsers decode (base64, quoted-printable), is not
            // the text the check would compare.
            let file = disposition.is_some_and(|d| {
                d.split(|&b| b == b';')
                    .filter_map(split_param)
                    .any(|(k, _)| {
                        k.eq_ignore_ascii_case(b"filename") || k.eq_ignore_ascii_case(b"filename*")
                    })
            });
            let encoded = headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("content-transfer-encoding"));
            if file || encoded {
                return None;
            }
            if found.is_some() {
                return None;
            }
            found = Some(String::from_utf8(part[head_len..].to_vec()).ok()?);
        }
        rest = &rest[end + delimiter.len()..];
    }
}

/// Whether a content type is `multipart/form-data` (with or without parameters).
pub fn is_multipart(content_type: Option<&[u8]>) -> bool {
    content_type.is_some_and(|ct| {
        let media = ct.split(|&b| b == b';').next().unwrap_or_default();
        media
            .trim_ascii()
            .eq_ignore_ascii_case(b"multipart/form-data")
    })
}

/// `boundary` of a `multipart/form-data` content type (media types are case-insensitive).
/// A content type that names its boundary twice is refused: parsers take the first or the
/// last, and read two different forms.
fn boundary(content_type: &[u8]) -> Option<&[u8]> {
    let mut params = content_type.split(|&b| b == b';');
    let media = params.next()?.trim_ascii();
    if !media.eq_ignore_ascii_case(b"multipart/form-data") {
        return None;
    }
    let mut found = None;
    for (k, v) in params.filter_map(split_param) {
        let k = k.strip_suffix(b"*").unwrap_or(k);
        if k.eq_ignore_ascii_case(b"boundary") {
            if found.is_some() {
                return None;
            }
            found = Some(v);
        }
    }
    found.filter(|v| !v.is_empty() && v.len() <= 70)
}

/// A `Content-Disposition` that parsers may read differently.
#[derive(Debug, PartialEq)]
struct Ambiguous;

/// `name` of `form-data; name="model"`. A disposition that gives a parameter twice
/// (`name="x"; name="model"`: some parsers take the first, others the last), or an
/// RFC 2231 `name*` (which some decode and others ignore), or a name with a quote or a
/// backslash inside, is ambiguous.
fn field_name(disposition: &[u8]) -> Result<Option<&[u8]>, Ambiguous> {
    let mut params = disposition.split(|&b| b == b';');
    if !params
        .next()
        .unwrap_or_default()
        .trim_ascii()
        .eq_ignore_ascii_case(b"form-data")
    {
        return Ok(None);
    }
    let mut seen: Vec<&[u8]> = Vec::new();
    let mut name = None;
    for p in params {
        let Some((k, v)) = split_param(p) else {
            continue;
        };
        if k.eq_ignore_ascii_case(b"name*") || seen.iter().any(|s| s.eq_ignore_ascii_case(k)) {
            return Err(Ambiguous);
        }
        seen.push(k);
        if k.eq_ignore_ascii_case(b"name") {
            if v.iter().any(|&b| b == b'"' || b == b'\\') {
                return Err(Ambiguous);
            }
            name = Some(v);
        }
    }
    Ok(name)
}

fn split_param(p: &[u8]) -> Option<(&[u8], &[u8])> {
    let eq = p.iter().position(|&b| b == b'=')?;
    let (k, v) = (p[..eq].trim_ascii(), p[eq + 1..].trim_ascii());
    let v = v
        .strip_prefix(b"\"")
        .and_then(|v| v.strip_suffix(b"\""))
        .unwrap_or(v);
    Some((k, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispositions_parsers_read_differently_are_refused() {
        let part = |disposition: &str| {
            format!("--XyZ\r\nContent-Disposition: {disposition}\r\n\r\nwhisper-1\r\n--XyZ--\r\n")
        };
        for d in [
            r#"form-data; name="x"; name="model""#,
            r#"form-data; name="model"; name="x""#,
            r#"form-data; name*=UTF-8''model"#,
            r#"form-data; name="model"; NAME="x""#,
            r#"form-data; name="mo\"del""#,
        ] {
            assert_eq!(model(Some(CT), part(d).as_bytes()), None, "{d}");
        }
        assert_eq!(
            model(Some(CT), part(r#"form-data; name="model""#).as_bytes()).as_deref(),
            Some("whisper-1")
        );
        let two = b"multipart/form-data; boundary=XyZ; boundary=Other";
        assert_eq!(
            model(Some(two), part(r#"form-data; name="model""#).as_bytes()),
            None
        );
    }

    const CT: &[u8] = b"multipart/form-data; boundary=XyZ";

    fn form(parts: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (name, value) in parts {
            b.extend_from_slice(
                format!(
                    "--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                )
                .as_bytes(),
            );
        }
        b.extend_from_slice(b"--XyZ--\r\n");
        b
    }

    #[test]
    fn reads_the_model_field() {
        let body = form(&[
            ("file", "RIFF....WAVE"),
            ("model", "whisper-1"),
            ("language", "en"),
        ]);
        assert_eq!(model(Some(CT), &body).as_deref(), Some("whisper-1"));
        assert_eq!(
            model(Some(b"Multipart/Form-Data; boundary=\"XyZ\""), &body).as_deref(),
            Some("whisper-1")
        );
        assert_eq!(model(Some(CT), &form(&[("file", "x")])), None);
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let two = form(&[("model", "whisper-1"), ("model", "gpt-4o-transcribe")]);
        assert_eq!(model(Some(CT), &two), None, "two models: which one?");
        assert_eq!(
            model(Some(b"application/json"), &form(&[("model", "m")])),
            None
        );
        assert_eq!(model(None, &form(&[("model", "m")])), None);
        assert_eq!(
            model(
                Some(CT),
                b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm"
            ),
            None
        );
        assert_eq!(model(Some(CT), b"garbage"), None);
        let cased = form(&[("model", "whisper-1"), ("MODEL", "gpt-4o-transcribe")]);
        assert_eq!(
            model(Some(CT), &cased),
            None,
            "a field the upstream may fold"
        );
        assert_eq!(model(Some(CT), &form(&[("Model", "m")])), None);
        let twice = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--XyZ--\r\n";
        assert_eq!(model(Some(CT), twice), None, "which disposition counts?");
        let file = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.txt\"\r\n\r\nm\r\n--XyZ--\r\n";
        assert_eq!(model(Some(CT), file), None, "a file is not a field");
        let encoded = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\nContent-Transfer-Encoding: base64\r\n\r\nZ3B0LTRv\r\n--XyZ--\r\n";
        assert_eq!(model(Some(CT), encoded), None, "decoded by some parsers");
    }
}
