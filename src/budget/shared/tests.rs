use super::*;

#[test]
fn replies_read_exactly_near_the_cap() {
    let r = parse("ok 999999999999999998 999999999999999999 1 7").unwrap();
    assert_eq!(r.verdict, Verdict::Ok);
    assert_eq!(r.before, 999_999_999_999_999_998);
    assert_eq!(r.spent, 999_999_999_999_999_999);
    assert_eq!((r.live, r.writes), (1, 7));
    assert_eq!(parse("no 0 0 5 1").unwrap().verdict, Verdict::No);
    assert_eq!(parse("stale 1 1 0 2").unwrap().verdict, Verdict::Stale);
    assert!(parse("ok 1 2 3").is_err());
    assert!(parse("ok 1 x 2 1").is_err());
    assert!(parse("maybe 1 1 1 1").is_err());
}

#[test]
fn the_mirror_keeps_the_latest_picture() {
    let reply = |spent, writes| Reply {
        verdict: Verdict::Ok,
        before: 0,
        spent,
        live: 0,
        writes,
    };
    let mut r = Record::default();
    r.see(&reply(5, 3));
    r.see(&reply(2, 1));
    assert_eq!((r.seen, r.seen_at), (Some((5, 0)), 3));
    r.see(&reply(9, 3));
    assert_eq!(r.seen, Some((9, 0)));
}

#[test]
fn one_slot_per_account_of_a_period() {
    let k = redis_key("team-monthly", "2026-12", "search");
    assert_eq!(k, "ezgate:budget:{team-monthly|2026-12|search}");
    let odd = redis_key("b}", "2026-12", "{x}");
    assert_eq!(odd, "ezgate:budget:{b_|2026-12|_x_}");
    assert_eq!(odd.matches('{').count(), 1);
}

#[test]
fn the_fallback_is_a_share_of_what_was_left() {
    const D: Amount = 1_000_000_000;
    assert_eq!(share_left(10 * D, 4 * D, 2 * D, 2), 2 * D);
    assert_eq!(share_left(10 * D, 4 * D, 2 * D, 0), 4 * D);
    assert_eq!(share_left(10 * D, 12 * D, 0, 3), 0);
    assert_eq!(share_left(u64::MAX, u64::MAX, 1, 1), 0);
}

#[test]
fn the_hash_outlives_its_window() {
    let end: jiff::Timestamp = "2027-01-01T00:00:00Z".parse().unwrap();
    let now: jiff::Timestamp = "2026-12-31T23:59:59Z".parse().unwrap();
    assert_eq!(ttl_ms(&end, now), (1000 + 86_400_000).to_string());
    assert_eq!(ttl_ms(&now, end), 86_400_000.to_string());
}

#[test]
fn a_record_is_idle_once_redis_took_everything() {
    let mut r = Record {
        spent: 5,
        version: 2,
        acked: 1,
        acked_spent: 3,
        ..Record::default()
    };
    assert_eq!(r.unsynced(), 2);
    assert!(!r.idle());
    r.acked = 2;
    assert!(r.idle());
    r.local = 1;
    assert!(!r.idle());
}
