//! The check that the tests, the benchmarks and the demo start no program outside the table of
//! `shadow_tests::program`, which `cargo xtask setup` installs: on a fresh machine, a program
//! missing from the table is a test that fails for want of a package (as `ab` once did).
//!
//! It reads every Rust, Python and shell file under `tests/` and `xtask/` and reports:
//! - a `Command::new` outside the two files allowed to start programs ([`STARTERS`]): anywhere
//!   else, programs are started as `Program::X.command()`, `Netns::exec(Program::X, ..)` or
//!   `Netns::run(Program::X, ..)`, so the compiler holds them to the table;
//! - a process started by other means (`exec*`, `posix_spawn`);
//! - a program name the table lacks, wherever one is spelt out: `Command::new("x")`, an argv
//!   `&["x", ..]` given to `exec` or `run`, the commands of a shell snippet (`sh -c "..."`) or
//!   of a script (a string starting `#!/bin/...`, or a `.sh` file), and a Python `subprocess`
//!   or `os.system` call.
use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
};

use shadow_tests::{
    Program,
    program::{SUPPORT_PACKAGES, Source, debian_packages},
};

/// The files that may call `Command::new`, and why.
const STARTERS: &[(&str, &str)] = &[
    (
        "tests/src/program.rs",
        "the table: Program::command, and program::built for the workspace's own binaries",
    ),
    (
        "xtask/src/venv.rs",
        "the programs of a pinned Python venv (vng, kubernetes-validate, its python and pip)",
    ),
];

/// This file: its examples start programs on purpose.
const THIS_FILE: &str = "xtask/src/program_starts.rs";

/// Shell builtins and keywords: never a program of the table.
const SHELL_BUILTINS: &[&str] = &[
    "!", "{", "}", ".", ":", "[", "[[", "alias", "break", "case", "cd", "continue", "declare",
    "do", "done", "echo", "elif", "else", "esac", "eval", "exit", "export", "false", "fi", "for",
    "function", "getopts", "hash", "if", "in", "kill", "let", "local", "printf", "pwd", "read",
    "readonly", "return", "select", "set", "shift", "source", "test", "then", "time", "trap",
    "true", "type", "typeset", "ulimit", "umask", "unset", "until", "wait", "while",
];

/// Words before a command that the command follows: `exec prog`, `command prog`.
const SHELL_PREFIXES: &[&str] = &[
    "exec", "command", "!", "if", "then", "else", "elif", "do", "while", "until", "{", "time",
];

/// What the check found wrong, where.
#[derive(Debug, PartialEq, Eq)]
struct Finding {
    file: String,
    line: usize,
    what: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.what)
    }
}

/// Collects the findings of one file.
struct Scan<'a> {
    file: &'a str,
    text: &'a str,
    table: &'a BTreeSet<&'a str>,
    found: Vec<Finding>,
}

impl Scan<'_> {
    fn report(&mut self, at: usize, what: String) {
        let line = self.text[..at.min(self.text.len())].matches('\n').count() + 1;
        self.found.push(Finding {
            file: self.file.to_owned(),
            line,
            what,
        });
    }

    /// Reports `name` unless the table has it.
    fn check_name(&mut self, at: usize, name: &str, how: &str) {
        if !self.table.contains(name) {
            self.report(
                at,
                format!(
                    "{how} starts `{name}`, which the program table (tests/src/program.rs) \
                     lacks: add it there with its Debian package or crate, so that `cargo xtask \
                     setup` installs it"
                ),
            );
        }
    }

    /// Reports every command of a shell `script` the table lacks.
    fn check_shell(&mut self, at: usize, script: &str, how: &str) {
        for command in shell_commands(script) {
            self.check_name(at, &command, how);
        }
    }

    fn rust(&mut self) {
        let text = self.text;
        let code = without_line_comments(text);
        let may_start = STARTERS.iter().any(|(file, _)| *file == self.file);
        for at in positions(&code, "Command::new(") {
            if !may_start {
                self.report(
                    at,
                    "`Command::new` outside the program table: start programs with \
                     `Program::X.command()` or `Netns::exec(Program::X, ..)` (tests/src/program.rs)"
                        .to_owned(),
                );
            }
            let arg = at + "Command::new(".len();
            if let Some((name, _)) = rust_literal_at(&code, arg) {
                self.check_name(at, &name, "Command::new");
            }
        }
        for call in [
            "execv(",
            "execvp(",
            "execve(",
            "execvpe(",
            "fexecve(",
            "posix_spawn",
        ] {
            for at in word_positions(&code, call) {
                self.report(
                    at,
                    format!("`{call}` starts a process outside the program table"),
                );
            }
        }
        // Untyped argv lists, as the helpers once took them.
        for pattern in [".exec(&[", ".run(&[", ".spawn(&["] {
            for at in positions(&code, pattern) {
                if let Some((name, _)) = rust_literal_at(&code, at + pattern.len()) {
                    self.check_name(at, &name, "an argv");
                }
            }
        }
        // Shell snippets: `-c` and a literal after a shell, within its statement.
        for shell in [
            "Program::Sh",
            "Program::Bash",
            "Command::new(\"sh\")",
            "Command::new(\"bash\")",
            "\"sh\", \"-c\"",
            "\"bash\", \"-c\"",
        ] {
            for at in positions(&code, shell) {
                let statement = &code[at..];
                let statement = &statement[..statement.find(";\n").unwrap_or(statement.len())];
                let Some(c) = statement.find("\"-c\"") else {
                    continue;
                };
                let after = &statement[c + "\"-c\"".len()..];
                let comma = after.len() - after.trim_start().len();
                let arg = at
                    + c
                    + "\"-c\"".len()
                    + comma
                    + usize::from(after.trim_start().starts_with(','));
                match rust_literal_at(&code, arg) {
                    Some((script, _)) => self.check_shell(at, &script, "a shell snippet"),
                    None => self.report(
                        at,
                        "a shell snippet this check cannot read: give it as a string literal"
                            .to_owned(),
                    ),
                }
            }
        }
        // Scripts held in string literals: `"#!/bin/sh ...`, raw or not.
        for shebang in positions(&code, "#!/") {
            let before = &code[..shebang];
            let Some(quote) = ["r#\"", "r\"", "\""]
                .iter()
                .find(|q| before.ends_with(**q))
                .map(|q| shebang - q.len())
            else {
                continue;
            };
            if let Some((script, _)) = rust_literal_at(&code, quote) {
                self.check_shell(quote, &script, "a script");
            }
        }
        self.python(&code);
    }

    /// Python's ways to start a process, in a `.py` file or in Python code held in a string.
    fn python(&mut self, code: &str) {
        for module in ["subprocess.", "os."] {
            for at in word_positions(code, module) {
                let rest = &code[at + module.len()..];
                let function: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let starts_program = match module {
                    "subprocess." => [
                        "run",
                        "call",
                        "check_call",
                        "check_output",
                        "Popen",
                        "getoutput",
                        "getstatusoutput",
                    ]
                    .contains(&function.as_str()),
                    _ => {
                        ["system", "popen"].contains(&function.as_str())
                            || function.starts_with("exec")
                            || function.starts_with("spawn")
                            || function.starts_with("posix_spawn")
                    }
                };
                let Some(args) = rest[function.len()..].strip_prefix('(') else {
                    continue;
                };
                if !starts_program {
                    continue;
                }
                let args = args.trim_start();
                let (list, args) = match args.strip_prefix('[') {
                    Some(a) => (true, a.trim_start()),
                    None => (false, args),
                };
                // A quote, or an escaped one in Python held in a Rust string.
                let args = args.strip_prefix('\\').unwrap_or(args);
                let literal = args
                    .chars()
                    .next()
                    .filter(|q| *q == '"' || *q == '\'')
                    .and_then(|q| args[1..].split_once(q))
                    .map(|(t, _)| t.trim_end_matches('\\').to_owned());
                let names_a_program =
                    list || module == "os." && !["system", "popen"].contains(&function.as_str());
                match literal {
                    Some(program) if names_a_program => self.check_name(at, &program, "Python"),
                    Some(command) => self.check_shell(at, &command, "Python"),
                    None => self.report(
                        at,
                        format!(
                            "Python `{module}{function}` with a program this check cannot read: \
                             spell it out as a string literal"
                        ),
                    ),
                }
            }
        }
    }
}

/// Every finding in the sources of `tests/` and `xtask/` under `root`, with `table` the names of
/// the programs the table has.
fn scan(root: &Path, table: &BTreeSet<&str>) -> Vec<Finding> {
    let mut files = Vec::new();
    for dir in ["tests", "xtask"] {
        sources(&root.join(dir), &mut files);
    }
    files.sort();
    let mut found = Vec::new();
    for path in files {
        let file = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        if file == THIS_FILE {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        found.extend(scan_file(&file, &text, table));
    }
    found
}

/// The findings of one file, by its kind.
fn scan_file(file: &str, text: &str, table: &BTreeSet<&str>) -> Vec<Finding> {
    let mut scan = Scan {
        file,
        text,
        table,
        found: Vec::new(),
    };
    match Path::new(file).extension().and_then(|e| e.to_str()) {
        Some("rs") => scan.rust(),
        Some("py") => scan.python(text),
        Some("sh") => scan.check_shell(0, text, "a script"),
        _ => {}
    }
    scan.found.sort_by_key(|f| f.line);
    scan.found
}

/// Rust, Python and shell files under `dir`, leaving out build output.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                sources(&path, out);
            }
        } else if path
            .extension()
            .is_some_and(|e| e == "rs" || e == "py" || e == "sh")
        {
            out.push(path);
        }
    }
}

/// Byte offsets of every occurrence of `needle`.
fn positions(text: &str, needle: &str) -> Vec<usize> {
    text.match_indices(needle).map(|(at, _)| at).collect()
}

/// Byte offsets of every occurrence of `needle` that does not continue a name (`os.` but not
/// `pos.`).
fn word_positions(text: &str, needle: &str) -> Vec<usize> {
    positions(text, needle)
        .into_iter()
        .filter(|&at| {
            !text[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
        .collect()
}

/// `text` with every line that is a `//` comment blanked, byte for byte, so that offsets and
/// line numbers stay those of `text`.
fn without_line_comments(text: &str) -> String {
    text.split_inclusive('\n')
        .map(|line| {
            if line.trim_start().starts_with("//") {
                line.chars()
                    .map(|c| {
                        if c == '\n' {
                            "\n".to_owned()
                        } else {
                            " ".repeat(c.len_utf8())
                        }
                    })
                    .collect()
            } else {
                line.to_owned()
            }
        })
        .collect()
}

/// The contents of the Rust string literal (`"..."`, `r"..."`, `r#"..."#`) starting at `at`,
/// after whitespace, and the offset just past it; `None` if none starts there.
fn rust_literal_at(text: &str, at: usize) -> Option<(String, usize)> {
    let rest = text.get(at..)?;
    let skipped = rest.len() - rest.trim_start().len();
    let start = at + skipped;
    let rest = &text[start..];
    if let Some(raw) = rest.strip_prefix('r') {
        let hashes = raw.len() - raw.trim_start_matches('#').len();
        let body = raw[hashes..].strip_prefix('"')?;
        let close = format!("\"{}", "#".repeat(hashes));
        let end = body.find(&close)?;
        let consumed = 1 + hashes + 1 + end + close.len();
        return Some((body[..end].to_owned(), start + consumed));
    }
    let body = rest.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, start + 1 + i + 1)),
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, 't')) => out.push('\t'),
                // A line continuation: the newline and the next line's indent go.
                Some((_, '\n')) => {
                    let mut peek = chars.clone();
                    while let Some((_, w)) = peek.next() {
                        if !w.is_whitespace() {
                            break;
                        }
                        chars = peek.clone();
                    }
                }
                Some((_, other)) => out.push(other),
                None => return None,
            },
            c => out.push(c),
        }
    }
    None
}

/// A shell script split into simple commands, each a list of words (quotes removed).
#[derive(Default)]
struct ShellWords {
    commands: Vec<Vec<String>>,
    words: Vec<String>,
    word: Option<String>,
}

impl ShellWords {
    /// Adds to the current word, starting one if needed.
    fn push(&mut self, text: &str) {
        self.word.get_or_insert_with(String::new).push_str(text);
    }

    fn ends_with(&self, c: char) -> bool {
        self.word.as_ref().is_some_and(|w| w.ends_with(c))
    }

    fn end_word(&mut self) {
        if let Some(word) = self.word.take() {
            self.words.push(word);
        }
    }

    fn end_command(&mut self) {
        self.end_word();
        if !self.words.is_empty() {
            self.commands.push(std::mem::take(&mut self.words));
        }
    }
}

/// The programs a shell script runs: the first word of each simple command, past assignments,
/// redirections and `exec`/`command`, in pipelines, lists and command substitutions; builtins,
/// keywords, the script's own functions and commands from a variable (`"$@"`) left out.
fn shell_commands(script: &str) -> Vec<String> {
    let functions: BTreeSet<&str> = script
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().split_once("()")?;
            let name = name.trim().trim_start_matches("function ").trim();
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            (valid && (rest.trim().is_empty() || rest.trim_start().starts_with('{')))
                .then_some(name)
        })
        .collect();
    let mut found = Vec::new();
    let mut split = ShellWords::default();
    let chars: Vec<char> = script.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' => {
                i += 1;
                if let Some(&next) = chars.get(i)
                    && next != '\n'
                {
                    split.push(&next.to_string());
                }
            }
            '\'' => {
                let end = (i + 1..chars.len())
                    .find(|&j| chars[j] == '\'')
                    .unwrap_or(chars.len());
                split.push(&chars[i + 1..end].iter().collect::<String>());
                i = end;
            }
            '"' => {
                split.push("");
                let mut j = i + 1;
                while j < chars.len() && chars[j] != '"' {
                    if chars[j] == '\\' {
                        j += 1;
                    } else if chars[j] == '$' && chars.get(j + 1) == Some(&'(') {
                        let end = matching_paren(&chars, j + 1);
                        found.extend(substitution(&chars, j + 1, end));
                        split.push("$");
                        j = end;
                    } else {
                        split.push(&chars[j].to_string());
                    }
                    j += 1;
                }
                i = j;
            }
            '$' if chars.get(i + 1) == Some(&'(') => {
                let end = matching_paren(&chars, i + 1);
                found.extend(substitution(&chars, i + 1, end));
                split.push("$");
                i = end;
            }
            '`' => {
                let end = (i + 1..chars.len())
                    .find(|&j| chars[j] == '`')
                    .unwrap_or(chars.len());
                found.extend(shell_commands(
                    &chars[i + 1..end].iter().collect::<String>(),
                ));
                split.push("$");
                i = end;
            }
            '#' if split.word.is_none() => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            // `>&`, `<&`, `>|` and `&>` are redirections, not list operators.
            '&' | '|' if split.ends_with('>') || split.ends_with('<') => split.push(&c.to_string()),
            '&' if chars.get(i + 1) == Some(&'>') => {
                split.end_word();
                split.push("&");
            }
            ' ' | '\t' => split.end_word(),
            '\n' | ';' | '|' | '&' | '(' | ')' => split.end_command(),
            c => split.push(&c.to_string()),
        }
        i += 1;
    }
    split.end_command();
    for words in &split.commands {
        let mut words = words.iter().map(String::as_str).peekable();
        while let Some(&w) = words.peek() {
            let assignment = w.split_once('=').is_some_and(|(name, _)| {
                !name.is_empty()
                    && name
                        .trim_end_matches('+')
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_')
            });
            let redirection = w.starts_with(['>', '<', '&'])
                || w.trim_start_matches(|c: char| c.is_ascii_digit())
                    .starts_with(['>', '<']);
            if assignment || redirection || SHELL_PREFIXES.contains(&w) {
                words.next();
            } else {
                break;
            }
        }
        let Some(command) = words.next() else {
            continue;
        };
        if ["for", "case", "select", "function"].contains(&command)
            || command.starts_with('$')
            || SHELL_BUILTINS.contains(&command)
            || functions.contains(command)
        {
            continue;
        }
        found.push(command.to_owned());
    }
    found
}

/// The index of the `)` that closes the `(` at `open` (or the end).
fn matching_paren(chars: &[char], open: usize) -> usize {
    let mut depth = 0;
    for (j, &c) in chars.iter().enumerate().skip(open) {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return j;
                }
            }
            _ => {}
        }
    }
    chars.len()
}

/// The commands of the substitution `$(...)` whose `(` is at `open` and `)` at `close`;
/// arithmetic `$((...))` runs none.
fn substitution(chars: &[char], open: usize, close: usize) -> Vec<String> {
    if chars.get(open + 1) == Some(&'(') {
        return Vec::new();
    }
    let inner: String = chars[open + 1..close.min(chars.len())].iter().collect();
    shell_commands(&inner)
}

/// The binary names of the table.
fn table() -> BTreeSet<&'static str> {
    Program::ALL.iter().map(|p| p.name()).collect()
}

mod tests {
    use super::*;

    #[test]
    fn every_program_started_is_in_the_table() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let found = scan(root, &table());
        assert!(
            found.is_empty(),
            "programs started outside the table of tests/src/program.rs:\n{}",
            found
                .iter()
                .map(Finding::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
        // It read what it is meant to: the allowed starters exist, and the sources include
        // the integration tests, the test helpers' script and xtask.
        let mut files = Vec::new();
        for dir in ["tests", "xtask"] {
            sources(&root.join(dir), &mut files);
        }
        for file in STARTERS.iter().map(|(file, _)| *file).chain([
            "tests/tests/capture.rs",
            "tests/src/app.py",
            "xtask/src/kernels.rs",
        ]) {
            assert!(files.contains(&root.join(file)), "{file} was not read");
        }
    }

    #[test]
    fn the_table_names_each_program_once_and_every_source_fully() {
        let names = table();
        assert_eq!(names.len(), Program::ALL.len(), "a binary name twice");
        for program in Program::ALL {
            match program.source() {
                Source::Debian(package) => assert!(!package.is_empty(), "{program:?}"),
                Source::Crate { name, version } => {
                    assert!(!name.is_empty(), "{program:?}");
                    // Pinned to one release: `cargo install --version` takes a requirement too.
                    assert!(
                        version.split('.').count() == 3
                            && version.split('.').all(|n| n.parse::<u32>().is_ok()),
                        "{program:?}: version {version} is not an exact x.y.z"
                    );
                }
                Source::Toolchain(why) => assert!(!why.is_empty(), "{program:?}"),
                Source::Base { package, why } => {
                    assert!(!package.is_empty() && !why.is_empty(), "{program:?}")
                }
            }
        }
        let programs_packages: BTreeSet<&str> = Program::ALL
            .iter()
            .filter_map(|p| match p.source() {
                Source::Debian(package) => Some(package),
                _ => None,
            })
            .collect();
        for support in SUPPORT_PACKAGES {
            assert!(
                !programs_packages.contains(support.package) && !support.why.is_empty(),
                "{support:?}: a support package is no program's package, and says why"
            );
        }
        let packages = debian_packages();
        assert!(packages.contains(&"apache2-utils") && packages.contains(&"ca-certificates"));
        assert!(packages.windows(2).all(|w| w[0] < w[1]), "{packages:?}");
    }

    /// The table without `ab`, as it was when the first fresh run failed.
    fn without_ab() -> BTreeSet<&'static str> {
        let mut table = table();
        table.remove("ab");
        table
    }

    fn findings(file: &str, text: &str) -> Vec<String> {
        scan_file(file, text, &without_ab())
            .iter()
            .map(Finding::to_string)
            .collect()
    }

    #[test]
    fn a_command_new_outside_the_table_is_reported_with_an_unlisted_name() {
        let found = findings(
            "tests/tests/capture.rs",
            "fn t() {\n    let _ = std::process::Command::new(\"ab\").arg(\"-V\").status();\n}\n",
        );
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found[0].starts_with("tests/tests/capture.rs:2: `Command::new` outside"));
        assert!(found[1].contains("starts `ab`, which the program table"));
        // In the table's own file a Command::new is allowed, an unlisted name still is not.
        let found = findings("tests/src/program.rs", "Command::new(\"ab\")");
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found
                .iter()
                .all(|f| !f.contains("outside the program table"))
        );
    }

    #[test]
    fn the_missing_ab_of_the_first_fresh_run_is_caught() {
        // How the test started ab then: an argv given to `Netns::run`.
        let old =
            "    h.client\n        .run(&[\"ab\", \"-q\", \"-k\", \"-n\", \"1000\", &url]);\n";
        let found = findings("tests/tests/capture.rs", old);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].contains("starts `ab`"), "{found:#?}");
        // A listed program passes: wrk is in the table.
        assert!(findings("x.rs", "ns.run(&[\"wrk\", \"-t1\"]);").is_empty());
        // Comments are no starts.
        assert!(findings("x.rs", "// Command::new(\"ab\")\n").is_empty());
    }

    #[test]
    fn shell_snippets_are_read() {
        let ok =
            "Program::Sh.command().args([\"-c\", \"lscpu | sed -n 's/^Model name: *//p'\"]);\n";
        assert!(findings("xtask/src/bench.rs", ok).is_empty());
        let bad =
            "Program::Sh\n    .command()\n    .args([\"-c\", \"sync && ab -n 1 http://x/\"]);\n";
        let found = findings("xtask/src/bench.rs", bad);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].starts_with("xtask/src/bench.rs:1: a shell snippet starts `ab`"));
        let unreadable = "Program::Sh.command().args([\"-c\", &script]);\n";
        assert_eq!(findings("x.rs", unreadable).len(), 1);
        // `-c` of other programs is no shell snippet.
        assert!(findings("x.rs", "ns.exec(Program::Wrk, &[\"-c\", \"16\"]);\n").is_empty());
    }

    #[test]
    fn scripts_in_string_literals_are_read() {
        let script = "const S: &str = r#\"#!/bin/bash\n# a comment: ab would not count\nset -uo \
                      pipefail\nout=$1\nexec >\"$out/log\" 2>&1\necho \"== $(uname -r)\"\n\
                      run() {\n    local name=$1\n    if ! \"$@\"; then failed=1; fi\n}\n\
                      modprobe -a veth || echo failed\nrun x ab -n 1\nab -n 1 | sed s/a/b/\n\"#;\n";
        let found = findings("xtask/src/kernels.rs", script);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].contains("a script starts `ab`"), "{found:#?}");
    }

    #[test]
    fn shell_commands_of_lists_pipes_and_substitutions() {
        assert_eq!(
            shell_commands(
                "A=1 B=2 nginx -g 'daemon off;' 2>&1 | tee log; x=$(curl -s u) && \
                            `wrk -t1` || exec tcpdump -w f & command python3 -c 'a; b'\n\
                            echo $((1 + 2)) \"$(ip -j link)\"; \"$bin\" --version"
            ),
            ["curl", "wrk", "ip", "nginx", "tee", "tcpdump", "python3"]
        );
    }

    #[test]
    fn python_process_starts_are_read() {
        let found = findings(
            "tests/src/app.py",
            "import subprocess\nsubprocess.run([\"ab\", \"-n\", \"1\"])\nos.system(\"curl -s x | ab\")\n\
             subprocess.run(args)\n",
        );
        assert_eq!(found.len(), 3, "{found:#?}");
        assert!(found[0].starts_with("tests/src/app.py:2: Python starts `ab`"));
        assert!(found[1].starts_with("tests/src/app.py:3: Python starts `ab`"));
        assert!(found[2].contains("cannot read"));
        // Python held in a Rust string, with escaped quotes.
        let found = findings("x.rs", "let s = \"subprocess.run([\\\"ab\\\"])\";\n");
        assert_eq!(found.len(), 1, "{found:#?}");
    }

    #[test]
    fn other_ways_to_start_a_process_are_reported() {
        assert_eq!(
            findings("x.rs", "nix::unistd::execvp(&prog, &args)").len(),
            1
        );
    }

    #[test]
    fn rust_literals() {
        assert_eq!(
            rust_literal_at("x(  \"a\\\"b\\n\")", 2),
            Some(("a\"b\n".to_owned(), 12))
        );
        assert_eq!(
            rust_literal_at("r#\"say \"hi\"\"#;", 0).map(|l| l.0),
            Some("say \"hi\"".to_owned())
        );
        assert_eq!(
            rust_literal_at("\"a \\\n     b\"", 0).map(|l| l.0),
            Some("a b".to_owned())
        );
        assert_eq!(rust_literal_at("&script", 0), None);
    }
}
