fn main() -> std::process::ExitCode {
    breakwater::cli::main()
}
