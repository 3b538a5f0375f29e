use instastate::defstate;

defstate!(X = 1);

fn main() {}
