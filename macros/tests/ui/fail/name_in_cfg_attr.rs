use instastate::defstate;

defstate! {
    #[cfg_attr(all(), name = "pinned")]
    X: u64 = 0;
}

fn main() {}
