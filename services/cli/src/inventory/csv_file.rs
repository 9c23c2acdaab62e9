//! Targets from a CSV file (`--targets-csv`), read by the `csv` crate.

use std::collections::HashMap;

use super::{
    check_credential_name, check_transport, new_target, parse_port, ImportedTarget, InputError, InventoryError,
    NAME_A_CREDENTIAL,
};

/// Reads targets from CSV (RFC 4180, read by the `csv` crate): a header
/// line, then one target per line. A UTF-8 byte order mark (Excel's "CSV
/// UTF-8") is skipped.
///
/// Columns `host` (required), `transport`, `port`, `credential`, `wave`
/// fill the target's fields; a `labels` column holds `key=value` pairs
/// separated by `;`; every other column is a label named by its header.
/// Empty cells are left out; `#` starts a comment line.
pub fn parse_csv(text: &str, file: &str, default_transport: &str) -> Result<Vec<ImportedTarget>, InputError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader =
        csv::ReaderBuilder::new().has_headers(false).flexible(true).comment(Some(b'#')).from_reader(text.as_bytes());
    let mut header: Option<Vec<String>> = None;
    let mut targets = Vec::new();
    let mut record = csv::StringRecord::new();
    // Line numbers come from byte offsets: the reader's own line count
    // leaves out blank lines.
    let (mut counted_to, mut lines_before) = (0usize, 0usize);
    let mut line_of = |byte: usize| {
        let byte = byte.min(text.len());
        if byte >= counted_to {
            lines_before += text.as_bytes()[counted_to..byte].iter().filter(|b| **b == b'\n').count();
            counted_to = byte;
        }
        lines_before + 1
    };
    loop {
        let start = reader.position().byte() as usize;
        let more = reader.read_record(&mut record).map_err(|error| {
            let line = line_of(error.position().map_or(start, |p| p.byte() as usize));
            InputError::at_line(file, line, csv_error_message(&error))
        })?;
        if !more {
            break;
        }
        // The record's position is where the reader started it: before the
        // blank and comment lines it skipped on the way.
        let mut at = record.position().map_or(start, |p| p.byte() as usize);
        while let Some(rest) = text.get(at..).filter(|rest| rest.starts_with(['\n', '\r', '#'])) {
            at += if rest.starts_with('#') { rest.find('\n').map_or(rest.len(), |i| i + 1) } else { 1 };
        }
        let number = line_of(at);
        // A quoted cell may span lines in RFC 4180, but no field of a target
        // holds a line break; and the reader runs a quote that is never
        // closed to the end of the input, as one cell: refuse both.
        let raw = text.get(at..reader.position().byte() as usize).unwrap_or("");
        if raw.matches('"').count() % 2 == 1 || record.iter().any(|cell| cell.contains(['\n', '\r'])) {
            return Err(InputError::at_line(file, number, InventoryError::UnclosedCell.to_string()));
        }
        let cells: Vec<&str> = record.iter().collect();
        if cells.iter().all(|c| c.trim().is_empty()) || cells[0].trim_start().starts_with('#') {
            continue;
        }
        let Some(columns) = &header else {
            let columns: Vec<String> = cells.iter().map(|c| c.trim().to_owned()).collect();
            check_header(&columns).map_err(|error| InputError::at_line(file, number, error.to_string()))?;
            header = Some(columns);
            continue;
        };
        if cells.len() > columns.len() {
            return Err(InputError::at_line(
                file,
                number,
                format!("{} cells but the header names {} columns", cells.len(), columns.len()),
            ));
        }
        let field_error = |column: &str, message: String| InputError {
            file: file.to_owned(),
            line: Some(number),
            column: None,
            field: Some(column.to_owned()),
            message,
        };
        let mut target = new_target(default_transport);
        for (column, cell) in columns.iter().zip(&cells) {
            let cell = cell.trim();
            if cell.is_empty() {
                continue;
            }
            match column.to_ascii_lowercase().as_str() {
                "host" => target.host = cell.to_owned(),
                "transport" => {
                    target.transport = check_transport(cell).map_err(|e| field_error(column, e.to_string()))?
                }
                "port" => target.port = Some(parse_port(cell).map_err(|e| field_error(column, e.to_string()))?),
                "credential" => {
                    target.credential =
                        Some(check_credential_name(cell).map_err(|e| field_error(column, e.to_string()))?)
                }
                "credential_ref" => {
                    return Err(field_error(column, format!("{NAME_A_CREDENTIAL} in a `credential` column")));
                }
                "wave" => target.wave = Some(cell.to_owned()),
                "labels" => {
                    for pair in cell.split(';').map(str::trim).filter(|p| !p.is_empty()) {
                        let (key, value) = pair.split_once('=').ok_or_else(|| {
                            field_error(column, format!("{pair:?} is not key=value (pairs are separated by ';')"))
                        })?;
                        target.labels.insert(key.trim().to_owned(), value.trim().to_owned());
                    }
                }
                _ => {
                    target.labels.insert(column.clone(), cell.to_owned());
                }
            }
        }
        if target.host.is_empty() {
            return Err(field_error("host", "must not be empty".into()));
        }
        targets.push(ImportedTarget { target, origin: format!("{file} line {number}") });
    }
    if header.is_none() {
        return Err(InputError::in_file(
            file,
            "no header line; the first line names the columns, e.g. host,transport,port",
        ));
    }
    Ok(targets)
}

/// The reader's error without its own position (the caller names the line).
fn csv_error_message(error: &csv::Error) -> String {
    match error.kind() {
        csv::ErrorKind::Utf8 { err, .. } => format!("not UTF-8 text (field {})", err.field() + 1),
        csv::ErrorKind::Io(err) => err.to_string(),
        _ => error.to_string(),
    }
}

pub(super) fn check_header(columns: &[String]) -> Result<(), InventoryError> {
    if !columns.iter().any(|c| c.eq_ignore_ascii_case("host")) {
        return Err(InventoryError::NoHostColumn { header: columns.join(",") });
    }
    let mut seen = HashMap::new();
    for (i, column) in columns.iter().enumerate() {
        if column.is_empty() {
            return Err(InventoryError::UnnamedColumn { number: i + 1 });
        }
        if let Some(first) = seen.insert(column.to_ascii_lowercase(), i) {
            return Err(InventoryError::DuplicateColumn { column: column.clone(), first: first + 1, second: i + 1 });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_columns_fill_fields_and_the_rest_are_labels() {
        let text = "\
# fleet of the Paris office
host,transport,port,credential,wave,site,labels
web-1.example.com,ssh,2222,fleet-ssh,canary,paris,role=web;tier=front
\"db,1\",ssh,,,,,

win-7,smb,445,windows-admin,,\"Paris, \"\"main\"\"\",
";
        let targets = parse_csv(text, "hosts.csv", "sim").unwrap();
        assert_eq!(targets.len(), 3);
        let web = &targets[0];
        assert_eq!(web.origin, "hosts.csv line 3");
        assert_eq!(web.target.host, "web-1.example.com");
        assert_eq!((web.target.transport.as_str(), web.target.port), ("ssh", Some(2222)));
        assert_eq!(web.target.credential.as_deref(), Some("fleet-ssh"));
        assert_eq!(web.target.wave.as_deref(), Some("canary"));
        let labels: Vec<(&str, &str)> = web.target.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(labels, vec![("role", "web"), ("site", "paris"), ("tier", "front")]);
        assert_eq!(targets[1].target.host, "db,1");
        assert_eq!(targets[1].target.port, None);
        assert!(targets[1].target.labels.is_empty());
        assert_eq!(targets[2].origin, "hosts.csv line 6");
        assert_eq!(targets[2].target.labels["site"], "Paris, \"main\"");
    }

    #[test]
    fn csv_from_excel_with_a_byte_order_mark_and_quoted_cells_reads_as_written() {
        let text = "\u{feff}host,site,labels\r\n\"web, 1\",\"Paris \"\"9e\"\"\",role=web\r\n\r\ndb1,lyon,\r\n";
        let targets = parse_csv(text, "excel.csv", "ssh").unwrap();
        assert_eq!(targets.len(), 2);
        assert_eq!(targets[0].target.host, "web, 1", "the BOM is not part of the header");
        assert_eq!(targets[0].target.labels["site"], "Paris \"9e\"");
        assert_eq!(targets[0].target.labels["role"], "web");
        assert_eq!((targets[1].target.host.as_str(), targets[1].origin.as_str()), ("db1", "excel.csv line 4"));
    }

    #[test]
    fn csv_defaults_to_the_given_transport() {
        let targets = parse_csv("host\nh1\nh2\n", "h.csv", "ssh").unwrap();
        assert!(targets.iter().all(|t| t.target.transport == "ssh"));
    }

    #[test]
    fn csv_mistakes_name_the_line_and_the_column() {
        let error = parse_csv("host,port\nh1,22\nh2,99999\n", "h.csv", "sim").unwrap_err();
        assert_eq!(error.to_string(), "h.csv:3: port: \"99999\" is not a port number (1-65535)");
        let error = parse_csv("host,transport\nh1,telnet\n", "h.csv", "sim").unwrap_err();
        assert!(error.to_string().starts_with("h.csv:2: transport: \"telnet\" is not a transport"), "{error}");
        let error = parse_csv("name,port\nh1,22\n", "h.csv", "sim").unwrap_err();
        assert!(error.to_string().starts_with("h.csv:1: the header \"name,port\" has no host column"), "{error}");
        let error = parse_csv("host,port\nh1,22,x\n", "h.csv", "sim").unwrap_err();
        assert_eq!(error.to_string(), "h.csv:2: 3 cells but the header names 2 columns");
        let error = parse_csv("host,credential_ref\nh1,file:/etc/shadow\n", "h.csv", "sim").unwrap_err();
        assert!(error.to_string().contains("credential_ref: fleetpatch never takes a secret's location"), "{error}");
        assert!(error.to_string().contains("ask an administrator to define a named credential"), "{error}");
        let error = parse_csv("host,credential\nh1,hunter2:pa55\n", "h.csv", "sim").unwrap_err();
        assert!(error.to_string().contains("credential: must name a credential"), "{error}");
        assert!(!error.to_string().contains("pa55"), "the cell is not repeated: {error}");
        let error = parse_csv("host,port\n,22\n", "h.csv", "sim").unwrap_err();
        assert_eq!(error.to_string(), "h.csv:2: host: must not be empty");
        let error = parse_csv("host\n\"h1\n", "h.csv", "sim").unwrap_err();
        assert!(error.to_string().starts_with("h.csv:2: a quoted cell is not closed"), "{error}");
        let error = parse_csv("host\n\"h1", "h.csv", "sim").unwrap_err();
        assert!(error.to_string().starts_with("h.csv:2: a quoted cell is not closed"), "{error}");
        let error = parse_csv("# only a comment\n", "h.csv", "sim").unwrap_err();
        assert!(error.to_string().contains("no header line"), "{error}");
    }
}
