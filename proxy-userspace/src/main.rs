fn main() {
    println!("{}", kproxy::EBPF_OBJECT.len());
}
