use super::*;

#[test]
fn model_labels_are_bounded_and_never_panic() {
    let m = Metrics::new(vec!["my-finetune".to_owned(), "gpt-*".to_owned()]).unwrap();
    assert_eq!(m.model_label(Some("gpt-4o-2024-08-06")), "gpt-4o");
    assert_eq!(m.model_label(Some("my-finetune")), "my-finetune");
    assert_eq!(
        m.model_label(Some("gpt-*")),
        "other",
        "globs are not label values"
    );
    assert_eq!(m.model_label(Some("anything-else")), "other");
    assert_eq!(m.model_label(None), "other");
    for weird in [
        "xxxxxxxxxxx-éééééé",
        "é",
        "-2024-08-06",
        "ab-2024-08-0é",
        "\u{0}\u{ffff}\u{10ffff}",
    ] {
        assert_eq!(m.model_label(Some(weird)), "other");
    }
}
