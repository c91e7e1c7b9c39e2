//! End-to-end tests of the batch commands through the real binary, on generated fixtures.
//! All integration tests live in this one binary so they share one build and link step.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use segmentd::io::snapshot_file;

fn segmentd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_segmentd"))
        .args(args)
        .env_remove("SEGMENTD_CONFIG")
        .output()
        .expect("segmentd runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// A small synthetic shop written by `segmentd generate`.
fn shop(dir: &Path) -> PathBuf {
    let out = dir.join("shop");
    let run = segmentd(&[
        "generate",
        "--customers",
        "600",
        "--order-lines",
        "9000",
        "--days",
        "200",
        "--seed",
        "3",
        "--out-dir",
        p(&out),
    ]);
    assert!(run.status.success(), "{}", text(&run));
    out
}

fn inputs(shop: &Path) -> Vec<String> {
    vec![
        "--orders".into(),
        shop.join("orders.csv").display().to_string(),
        "--returns".into(),
        shop.join("returns.csv").display().to_string(),
        "--support".into(),
        shop.join("support.csv").display().to_string(),
        "--engagement".into(),
        shop.join("engagement.csv").display().to_string(),
    ]
}

fn run_with(base: &[&str], extra: &[String]) -> Output {
    let mut args: Vec<&str> = base.to_vec();
    args.extend(extra.iter().map(String::as_str));
    segmentd(&args)
}

#[test]
fn discover_assign_validate_on_a_generated_shop() {
    let dir = tempfile::tempdir().unwrap();
    let shop = shop(dir.path());
    let snap = dir.path().join("snapshot.json");
    let run = run_with(
        &["discover", "--sample-size", "400", "--out", p(&snap)],
        &inputs(&shop),
    );
    assert!(run.status.success(), "{}", text(&run));
    let report = text(&run);
    assert!(report.contains("purchase_frequency"), "{report}");
    assert!(report.contains("silhouette"), "{report}");
    let valid = snapshot_file::load(&snap).expect("discover writes a valid snapshot");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&snap).unwrap()).unwrap();
    super::support::assert_schema_valid(
        &super::support::schema("snapshot"),
        &json,
        "discover's snapshot",
    );
    let s = valid.snapshot();
    assert_eq!(s.source.population, 600);
    assert_eq!(s.source.sampled, 400);
    assert_eq!(s.axes.len(), 13, "skipped: {:?}", s.skipped_axes);
    for axis in &s.axes {
        assert!((2..=6).contains(&axis.k));
        assert_eq!(axis.candidates.len(), 5);
    }

    // CSV with standardised features.
    let csv_out = dir.path().join("m.csv");
    let run = run_with(
        &[
            "assign",
            "--snapshot",
            p(&snap),
            "--out",
            p(&csv_out),
            "--with-features",
        ],
        &inputs(&shop),
    );
    assert!(run.status.success(), "{}", text(&run));
    let mut reader = csv::Reader::from_path(&csv_out).unwrap();
    let headers = reader.headers().unwrap().clone();
    assert_eq!(&headers[0], "customer_id");
    assert!(headers
        .iter()
        .any(|h| h == "purchase_value.z.avg_order_value_log"));
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 600);
    // Memberships of each assigned axis sum to 1.
    let m_cols: Vec<usize> = headers
        .iter()
        .enumerate()
        .filter(|(_, h)| h.starts_with("purchase_frequency.m"))
        .map(|(i, _)| i)
        .collect();
    for row in &rows {
        if row[m_cols[0]].is_empty() {
            continue;
        }
        let sum: f64 = m_cols.iter().map(|&i| row[i].parse::<f64>().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-3, "memberships sum to {sum}");
    }

    // JSON Lines.
    let jsonl = dir.path().join("m.jsonl");
    let run = run_with(
        &["assign", "--snapshot", p(&snap), "--out", p(&jsonl)],
        &inputs(&shop),
    );
    assert!(run.status.success(), "{}", text(&run));
    let body = std::fs::read_to_string(&jsonl).unwrap();
    let first: serde_json::Value = serde_json::from_str(body.lines().next().unwrap()).unwrap();
    assert_eq!(first["snapshot_version"], 1);
    assert!(
        first["axes"].as_object().unwrap().len() + first["missing_axes"].as_array().unwrap().len()
            == 13
    );

    // On the data it was discovered from, the sample's segment shares match the population's:
    // the share check (KL below 0.1) passes on every axis. (The per-segment mean check can
    // fail on a segment of a handful of customers here: 400 of 600 are sampled.)
    let run = run_with(&["validate", "--snapshot", p(&snap)], &inputs(&shop));
    let report = text(&run);
    let rows: Vec<Vec<&str>> = report
        .lines()
        .skip_while(|l| !l.starts_with("axis "))
        .skip(1)
        .take_while(|l| !l.starts_with("time:"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|cols| cols.len() == 9 && matches!(cols[8], "pass" | "FAIL"))
        .collect();
    assert_eq!(rows.len(), 13, "{report}");
    for cols in &rows {
        let kl: f64 = cols[2].parse().unwrap();
        assert!(kl < 0.1, "{}: KL {kl}\n{report}", cols[0]);
        // The snapshot's k and the population's own choice among k - 1, k and k + 1.
        let k: usize = cols[5].parse().unwrap();
        assert!((2..=6).contains(&k), "{report}");
        assert_eq!(cols[6], "/", "{report}");
        let population_k: usize = cols[7].parse().unwrap();
        // An axis whose population prefers another k has its warning line, and only then.
        let warned = report.lines().any(|l| {
            l.starts_with(&format!(
                "warning: {}: the population prefers k={population_k} to the snapshot's k={k} ",
                cols[0]
            ))
        });
        assert_eq!(warned, population_k != k, "{}\n{report}", cols[0]);
    }
    // The exit code follows the verdict.
    let passed = report.contains("verdict: PASS");
    assert!(passed || report.contains("verdict: FAIL"), "{report}");
    assert_eq!(
        run.status.code(),
        Some(if passed { 0 } else { 1 }),
        "{report}"
    );

    // The same with a share check no sample can meet: FAIL, exit 1.
    let mut args = vec!["validate".to_string(), "--snapshot".into(), p(&snap).into()];
    args.extend(inputs(&shop));
    let run = Command::new(env!("CARGO_BIN_EXE_segmentd"))
        .args(&args)
        .env_remove("SEGMENTD_CONFIG")
        .env("SEGMENTD__VALIDATE__MAX_KL", "1e-12")
        .output()
        .unwrap();
    let report = text(&run);
    assert!(report.contains("verdict: FAIL"), "{report}");
    assert_eq!(run.status.code(), Some(1), "{report}");
}

#[test]
fn new_customers_are_assigned_against_an_existing_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let shop = shop(dir.path());
    let snap = dir.path().join("snapshot.json");
    let run = run_with(&["discover", "--out", p(&snap)], &inputs(&shop));
    assert!(run.status.success(), "{}", text(&run));
    let later = dir.path().join("later.csv");
    std::fs::write(
        &later,
        "customer_id,order_id,event_time,product_id,category,quantity,unit_price,list_price,channel\n\
         NEW1,n1,2024-07-01 10:00:00,P1,C1,1,10.00,12.00,web\n\
         NEW1,n2,2024-07-09 10:00:00,P2,C2,2,5.00,5.00,app\n",
    )
    .unwrap();
    let out = dir.path().join("later_m.csv");
    let run = segmentd(&[
        "assign",
        "--snapshot",
        p(&snap),
        "--orders",
        p(&later),
        "--out",
        p(&out),
    ]);
    assert!(run.status.success(), "{}", text(&run));
    let mut reader = csv::Reader::from_path(&out).unwrap();
    let headers = reader.headers().unwrap().clone();
    let row = reader.records().next().unwrap().unwrap();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    assert_eq!(&row[0], "NEW1");
    assert_eq!(&row[1], "1");
    // Two orders eight days apart: frequency, value and cadence axes all get a segment.
    for axis in ["purchase_frequency", "purchase_value", "purchase_cadence"] {
        let segment: u32 = row[col(&format!("{axis}.segment"))].parse().unwrap();
        assert!(segment >= 1, "{axis}");
    }
}

/// An export shaped like a real grocery file: BOM, every field quoted, M/D/YYYY dates, ids
/// with leading zeros, no order id, no list price, no returns or support.
fn grocery_export(path: &Path, customers: u32) {
    let mut out = String::from("\u{feff}\"TRANSACTION_DT\",\"CUSTOMER_ID\",\"AGE_GROUP\",\"PRODUCT_SUBCLASS\",\"PRODUCT_ID\",\"AMOUNT\",\"ASSET\",\"SALES_PRICE\"\n");
    let mut x: u64 = 12345;
    let mut next = |m: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % m
    };
    for c in 0..customers {
        let visits = 1 + next(12) + u64::from(c % 5) * 3;
        let spend_level = 20 + (c % 7) as u64 * 30;
        for _ in 0..visits {
            let day = 1 + next(28);
            let month = [11, 12, 1, 2][next(4) as usize];
            let year = if month >= 11 { 2000 } else { 2001 };
            for _ in 0..(1 + next(6)) {
                let qty = 1 + next(3);
                let price = spend_level + next(50);
                out.push_str(&format!(
                    "\"{month}/{day}/{year}\",\"{:08}\",\"30-34\",\"{}\",\"{}\",\"{qty}\",\"{}\",\"{}\"\n",
                    c + 1,
                    100100 + next(40 + u64::from(c % 9) * 10),
                    4710000000000 + next(400),
                    price * qty * 8 / 10,
                    price * qty
                ));
            }
        }
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn a_grocery_export_maps_and_reports_the_axes_it_cannot_compute() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("grocery.csv");
    grocery_export(&file, 300);
    let snap = dir.path().join("snap.json");
    let run = segmentd(&[
        "discover",
        "--orders",
        p(&file),
        "--map",
        "customer_id=CUSTOMER_ID",
        "--map",
        "event_time=TRANSACTION_DT",
        "--map",
        "category=PRODUCT_SUBCLASS",
        "--map",
        "quantity=AMOUNT",
        "--map",
        "line_total=SALES_PRICE",
        "--out",
        p(&snap),
    ]);
    let report = text(&run);
    assert!(run.status.success(), "{report}");
    assert!(report.contains("price_sensitivity"), "{report}");
    assert!(
        report.contains("skipped: the input has no list_price"),
        "{report}"
    );
    assert!(report.contains("return_behavior"), "{report}");
    let s = snapshot_file::load(&snap).unwrap();
    let skipped: Vec<&str> = s
        .snapshot()
        .skipped_axes
        .iter()
        .map(|a| a.axis.as_str())
        .collect();
    for axis in [
        "price_sensitivity",
        "return_behavior",
        "communication_preference",
        "problem_complexity_profile",
        "product_knowledge",
    ] {
        assert!(skipped.contains(&axis), "{axis} not skipped: {skipped:?}");
    }
    // PRODUCT_ID matches the product_id field by name, case-insensitively: no mapping needed.
    for axis in [
        "category_exploration",
        "repurchase_behavior",
        "value_sophistication",
    ] {
        assert!(
            s.axes().iter().any(|a| a.model.axis.as_str() == axis),
            "{axis} missing"
        );
    }
}

#[test]
fn a_mapping_that_does_not_fit_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("grocery.csv");
    grocery_export(&file, 5);
    let run = segmentd(&[
        "discover",
        "--orders",
        p(&file),
        "--map",
        "customer_id=CUSTOMER_ID",
    ]);
    assert_eq!(run.status.code(), Some(2), "{}", text(&run));
    assert!(
        text(&run).contains("--map event_time=COLUMN"),
        "{}",
        text(&run)
    );
    let run = segmentd(&[
        "discover",
        "--orders",
        p(&file),
        "--map",
        "customer_id=NOPE",
    ]);
    assert_eq!(run.status.code(), Some(2));
    assert!(text(&run).contains("\"NOPE\""), "{}", text(&run));
}

#[test]
fn a_file_full_of_bad_rows_is_reported_line_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.csv");
    std::fs::write(
        &file,
        "customer_id,order_id,event_time,quantity,unit_price\n\
         ,o1,2024-01-01,1,10\n\
         a,o2,2024-13-45,1,10\n\
         b,o3,2024-01-01,-2,10\n\
         c,o4,2024-01-01,1,NaN\n\
         d,o5,2024-01-01,one,10\n\
         e,o6,2999-01-01,1,10\n\
         \"f,o7,2024-01-01,1,10\n",
    )
    .unwrap();
    let bad_rows = dir.path().join("bad_rows.csv");
    let run = segmentd(&[
        "discover",
        "--orders",
        p(&file),
        "--bad-rows",
        p(&bad_rows),
        "--out",
        p(&dir.path().join("s.json")),
    ]);
    let report = text(&run);
    assert_eq!(run.status.code(), Some(3), "{report}");
    assert!(report.contains("no valid events"), "{report}");
    for needle in [
        "line 2: bad customer_id",
        "line 3: bad event_time",
        "line 4: negative quantity",
        "line 5: bad number in unit_price",
        "line 6: bad number in quantity",
        "line 7: bad event_time",
    ] {
        assert!(report.contains(needle), "{needle:?} missing from {report}");
    }
    let written = std::fs::read_to_string(&bad_rows).unwrap();
    assert!(written.lines().count() >= 7, "{written}");

    let run = segmentd(&["discover", "--orders", p(&file), "--strict"]);
    assert_eq!(run.status.code(), Some(3));
    assert!(text(&run).contains(":2: bad customer_id"), "{}", text(&run));
}

#[test]
fn unknown_config_keys_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[discover]\nsampel_size = 3\n").unwrap();
    let file = dir.path().join("o.csv");
    grocery_export(&file, 3);
    let run = segmentd(&["discover", "--orders", p(&file), "--config", p(&cfg)]);
    assert_eq!(run.status.code(), Some(2));
    assert!(text(&run).contains("sampel_size"), "{}", text(&run));
}

#[test]
fn the_readme_feature_table_matches_the_code() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = segmentd::domain::features::markdown_table();
    assert!(
        readme.contains(&table),
        "README's feature table is stale: regenerate it with `segmentd schema --markdown`"
    );
}

#[test]
fn discover_carries_segment_ids_from_the_snapshot_it_replaces() {
    let dir = tempfile::tempdir().unwrap();
    let shop = shop(dir.path());
    let first = dir.path().join("v1.json");
    let run = run_with(
        &["discover", "--sample-size", "400", "--out", p(&first)],
        &inputs(&shop),
    );
    assert!(run.status.success(), "{}", text(&run));
    // The same data rediscovered: every segment is the same one and keeps its id.
    let second = dir.path().join("v2.json");
    let run = run_with(
        &[
            "discover",
            "--sample-size",
            "400",
            "--snapshot-version",
            "2",
            "--previous",
            p(&first),
            "--out",
            p(&second),
        ],
        &inputs(&shop),
    );
    assert!(run.status.success(), "{}", text(&run));
    let v1 = snapshot_file::load(&first).unwrap();
    let v2 = snapshot_file::load(&second).unwrap();
    let lineage = v2.snapshot().lineage.as_ref().expect("a lineage");
    assert_eq!(
        (lineage.previous_version, lineage.chain.clone()),
        (1, vec![1])
    );
    for (a, b) in v1.axes().iter().zip(v2.axes()) {
        let ids = |s: &segmentd::model::snapshot::ValidAxis| -> Vec<u32> {
            let mut ids: Vec<u32> = s.model.segments.iter().map(|g| g.id).collect();
            ids.sort_unstable();
            ids
        };
        assert_eq!(ids(a), ids(b), "{}", a.model.axis);
    }
    // A previous snapshot must be older.
    let run = run_with(
        &["discover", "--previous", p(&second), "--out", p(&first)],
        &inputs(&shop),
    );
    assert!(!run.status.success());
    assert!(text(&run).contains("--snapshot-version"), "{}", text(&run));
}

/// Reads a CSV into header → column and rows.
fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let mut r = csv::Reader::from_path(path).expect("csv");
    let header = r.headers().unwrap().iter().map(str::to_owned).collect();
    let rows = r
        .records()
        .map(|x| x.unwrap().iter().map(str::to_owned).collect())
        .collect();
    (header, rows)
}

fn column(header: &[String], name: &str) -> usize {
    header.iter().position(|h| h == name).expect(name)
}

#[test]
fn audiences_from_a_renamed_scores_file_with_bad_rows_conversions_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let gen = dir.path().join("gen");
    let out = segmentd(&[
        "generate",
        "--customers",
        "50",
        "--order-lines",
        "500",
        "--scores",
        "30000",
        "--products",
        "12",
        "--visitors",
        "4000",
        "-o",
        p(&gen),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // The same file under other column names, with bad rows appended.
    let generated = std::fs::read_to_string(gen.join("scores.csv")).unwrap();
    let mut lines = generated.lines();
    lines.next();
    let mut body = String::from("vid,sid,sku,p,ts\n");
    for line in lines {
        body.push_str(line);
        body.push('\n');
    }
    let good = body.lines().count() - 1;
    for bad in [
        "V1,S1,,0.5,2024-03-01T00:00:00Z",
        ",S1,P00001,0.5,2024-03-01T00:00:00Z",
        "V1,S1,P00001,NaN,2024-03-01T00:00:00Z",
        "V1,S1,P00001,1.5,2024-03-01T00:00:00Z",
        "V1,S1,P00001,-0.1,2024-03-01T00:00:00Z",
        "V1,S1,P00001,high,2024-03-01T00:00:00Z",
        "V1,S1,P00001,0.5,yesterday",
    ] {
        body.push_str(bad);
        body.push('\n');
    }
    let scores = dir.path().join("scores.csv");
    std::fs::write(&scores, body).unwrap();
    let (audiences, summary, plots, bad_rows) = (
        dir.path().join("audiences.csv"),
        dir.path().join("summary.csv"),
        dir.path().join("plots"),
        dir.path().join("bad.csv"),
    );
    let run = segmentd(&[
        "audiences",
        "--scores",
        p(&scores),
        "--conversions",
        p(&gen.join("conversions.csv")),
        "--map",
        "visitor_id=vid",
        "--map",
        "session_id=sid",
        "--map",
        "product_id=sku",
        "--map",
        "probability=p",
        "--map",
        "event_time=ts",
        "--out",
        p(&audiences),
        "--summary",
        p(&summary),
        "--plots",
        p(&plots),
        "--bad-rows",
        p(&bad_rows),
    ]);
    let report = text(&run);
    assert!(run.status.success(), "{report}");
    assert!(
        report.contains(&format!("{} scores, 7 bad rows", thousands(good))),
        "{report}"
    );
    for reason in ["product_id", "visitor_id", "probability", "event_time"] {
        assert!(report.contains(reason), "{reason} missing from {report}");
    }
    assert_eq!(
        std::fs::read_to_string(&bad_rows).unwrap().lines().count(),
        8
    );

    // The summary: the pooled line and one per product, all ready, ordered percentiles.
    let (h, rows) = read_csv(&summary);
    assert_eq!(rows.len(), 13, "pooled + 12 products");
    assert_eq!(rows[0][column(&h, "product_id")], "*");
    let mut cutoffs = std::collections::HashMap::new();
    for row in &rows[1..] {
        let f = |name: &str| row[column(&h, name)].parse::<f64>().unwrap();
        assert_eq!(row[column(&h, "readiness")], "ready");
        assert!(f("premium_percentile") > f("growth_percentile"));
        assert!(f("growth_percentile") > f("volume_percentile"));
        assert!(f("premium_cutoff") >= f("growth_cutoff"));
        assert!(f("growth_cutoff") >= f("volume_cutoff"));
        cutoffs.insert(
            row[column(&h, "product_id")].clone(),
            (f("premium_cutoff"), f("growth_cutoff"), f("volume_cutoff")),
        );
    }
    // A calibrated model: the premium tier converts better than visitors in no tier.
    let pooled = |name: &str| rows[0][column(&h, name)].parse::<f64>().unwrap();
    assert!(
        pooled("premium_conversion_rate") > 2.0 * pooled("unplaced_conversion_rate"),
        "{:?}",
        rows[0]
    );

    // Every audience row's tier follows from its probability and its product's cut-offs.
    let (h, rows) = read_csv(&audiences);
    assert!(rows.len() > 1000);
    for row in &rows {
        let prob: f64 = row[column(&h, "probability")].parse().unwrap();
        let (premium, growth, volume) = cutoffs[&row[column(&h, "product_id")]];
        let expected = if prob >= premium {
            "premium"
        } else if prob >= growth {
            "growth"
        } else {
            assert!(prob >= volume);
            "volume"
        };
        assert_eq!(row[column(&h, "tier")], expected, "{row:?}");
        assert!(["true", "false"].contains(&row[column(&h, "converted")].as_str()));
    }

    // One 1000×600 PNG per product.
    let pngs: Vec<_> = std::fs::read_dir(&plots).unwrap().collect();
    assert_eq!(pngs.len(), 12);
    let png = std::fs::read(plots.join("P00000.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let dim = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    assert_eq!((dim(16), dim(20)), (1000, 600));
}

fn thousands(n: usize) -> String {
    segmentd::batch::text::count(n as u64)
}

#[test]
fn audiences_report_small_and_constant_products_and_refuse_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let scores = dir.path().join("scores.csv");
    let mut body = String::from("visitor_id,product_id,probability\n");
    for i in 0..200 {
        body.push_str(&format!("v{i},wide,{}\n", f64::from(i) / 200.0));
    }
    for i in 0..50 {
        body.push_str(&format!("v{i},flat,0.25\n"));
    }
    for i in 0..5 {
        body.push_str(&format!("v{i},rare,0.{i}\n"));
    }
    std::fs::write(&scores, &body).unwrap();
    let (out, summary) = (dir.path().join("a.csv"), dir.path().join("s.csv"));
    let audiences = |extra: &[&str]| {
        let mut args = vec![
            "audiences",
            "--scores",
            p(&scores),
            "--out",
            p(&out),
            "--summary",
            p(&summary),
        ];
        args.extend_from_slice(extra);
        segmentd(&args)
    };
    let run = audiences(&[]);
    assert!(run.status.success(), "{}", text(&run));
    let (h, rows) = read_csv(&summary);
    let readiness = |product: &str| {
        rows.iter()
            .find(|r| r[column(&h, "product_id")] == product)
            .map(|r| r[column(&h, "readiness")].clone())
            .unwrap()
    };
    assert_eq!(readiness("wide"), "ready");
    assert_eq!(readiness("flat"), "constant");
    assert_eq!(readiness("rare"), "too_few_scores");
    let (h, rows) = read_csv(&out);
    assert!(rows.iter().all(|r| r[column(&h, "product_id")] == "wide"));
    // Undated scores all weigh the same: 200 evenly spread scores put about 10% in premium.
    let premium = rows
        .iter()
        .filter(|r| r[column(&h, "tier")] == "premium")
        .count();
    assert!((15..=25).contains(&premium), "{premium}");

    // --strict stops at the first bad row and names its line (exit 3).
    body.push_str("v1,wide,2.0\n");
    std::fs::write(&scores, &body).unwrap();
    let run = audiences(&["--strict"]);
    assert_eq!(run.status.code(), Some(3), "{}", text(&run));
    assert!(
        text(&run).contains(":257: probability 2 is outside [0, 1]"),
        "{}",
        text(&run)
    );

    // A file without a probability column is a usage error that lists the columns (exit 2).
    std::fs::write(&scores, "visitor_id,product_id,score\nv1,p,0.5\n").unwrap();
    let run = audiences(&[]);
    assert_eq!(run.status.code(), Some(2), "{}", text(&run));
    assert!(
        text(&run).contains("visitor_id, product_id, score"),
        "{}",
        text(&run)
    );
}
