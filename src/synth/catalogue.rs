//! The synthetic product catalogue: ~200 categories in 20 departments, ~5,000 products.
//!
//! Prices are log-normal around a per-category level that is itself log-normal around its
//! department's level, so spend is skewed the way real baskets are and "expensive category" is a
//! meaningful preference. Category popularity is Zipf-like, so a few categories carry most
//! orders.

use rand::seq::SliceRandom;
use rand::Rng;
use rand_distr::StandardNormal;

use super::persona::Persona;

/// Number of categories.
pub(crate) const CATEGORIES: usize = 200;
/// Number of products.
pub(crate) const PRODUCTS: usize = 5_000;
/// Fewest products in a category, so tier-based choice within a category has a range.
const MIN_PRODUCTS_PER_CATEGORY: usize = 5;

/// Departments with their typical list price; each holds `CATEGORIES / 20` categories.
const DEPARTMENTS: [(&str, f64); 20] = [
    ("grocery", 4.0),
    ("stationery", 6.0),
    ("health", 10.0),
    ("beauty", 12.0),
    ("books", 14.0),
    ("pet", 15.0),
    ("baby", 18.0),
    ("toys", 22.0),
    ("kitchen", 24.0),
    ("diy", 26.0),
    ("home", 28.0),
    ("garden", 30.0),
    ("fashion", 35.0),
    ("sports", 40.0),
    ("outdoor", 55.0),
    ("shoes", 60.0),
    ("jewellery", 90.0),
    ("electronics", 120.0),
    ("furniture", 180.0),
    ("computing", 260.0),
];

/// A product.
#[derive(Debug, Clone)]
pub(crate) struct Product {
    /// Product id, e.g. `P00042`.
    pub id: Box<str>,
    /// Index into [`Catalogue::categories`].
    pub category: u16,
    /// List price in cents.
    pub list_cents: u32,
}

/// A category.
#[derive(Debug, Clone)]
pub(crate) struct Category {
    /// Name, e.g. `kitchen_03`.
    pub name: Box<str>,
    /// Its products, cheapest first, so a price tier maps to a position.
    pub products: Vec<u32>,
}

/// Products, categories and the tables for choosing among them.
#[derive(Debug, Clone)]
pub(crate) struct Catalogue {
    /// All products; a product's index is its number.
    pub products: Vec<Product>,
    /// All categories.
    pub categories: Vec<Category>,
    /// Cumulative popularity, for choosing a category the way the average customer does.
    popularity: Vec<f64>,
    /// Cumulative popularity tilted by each persona's price preference.
    by_persona: Vec<Vec<f64>>,
}

impl Catalogue {
    /// Generates the catalogue; deterministic for a given random stream.
    pub(crate) fn generate(rng: &mut impl Rng) -> Self {
        let per_department = CATEGORIES / DEPARTMENTS.len();
        let mut levels = Vec::with_capacity(CATEGORIES);
        let mut names = Vec::with_capacity(CATEGORIES);
        for (dept, base) in DEPARTMENTS {
            for sub in 1..=per_department {
                names.push(format!("{dept}_{sub:02}"));
                levels.push(base * (0.35 * rng.sample::<f64, _>(StandardNormal)).exp());
            }
        }
        let mut ranks: Vec<usize> = (0..CATEGORIES).collect();
        ranks.shuffle(rng);
        let weights: Vec<f64> = ranks.iter().map(|&r| 1.0 / (r as f64 + 8.0)).collect();

        let counts = apportion(&weights, PRODUCTS, MIN_PRODUCTS_PER_CATEGORY);
        let mut products = Vec::with_capacity(PRODUCTS);
        let mut categories = Vec::with_capacity(CATEGORIES);
        for (c, (name, level)) in names.into_iter().zip(&levels).enumerate() {
            let mut prices: Vec<u32> = (0..counts[c])
                .map(|_| charm_cents(level * (0.45 * rng.sample::<f64, _>(StandardNormal)).exp()))
                .collect();
            prices.sort_unstable();
            let mut members = Vec::with_capacity(prices.len());
            for list_cents in prices {
                let number = products.len() as u32;
                members.push(number);
                products.push(Product {
                    id: format!("P{:05}", number + 1).into(),
                    category: c as u16,
                    list_cents,
                });
            }
            categories.push(Category {
                name: name.into(),
                products: members,
            });
        }

        let mean_log_level = levels.iter().map(|l| l.ln()).sum::<f64>() / levels.len() as f64;
        let by_persona = Persona::ALL
            .iter()
            .map(|p| {
                let tilt = p.profile().price_tilt;
                cumulative(
                    weights
                        .iter()
                        .zip(&levels)
                        .map(|(w, level)| w * ((level.ln() - mean_log_level) * tilt).exp()),
                )
            })
            .collect();
        Self {
            products,
            categories,
            popularity: cumulative(weights.iter().copied()),
            by_persona,
        }
    }

    /// A category chosen by popularity tilted towards the persona's price preference.
    pub(crate) fn category_for(&self, persona: Persona, rng: &mut impl Rng) -> u16 {
        pick(&self.by_persona[persona.index()], rng) as u16
    }

    /// A category chosen by plain popularity.
    pub(crate) fn popular_category(&self, rng: &mut impl Rng) -> u16 {
        pick(&self.popularity, rng) as u16
    }

    /// A product of the category near the given price tier (0 cheapest, 1 dearest).
    pub(crate) fn product_near_tier(&self, category: u16, tier: f64, rng: &mut impl Rng) -> u32 {
        let members = &self.categories[usize::from(category)].products;
        let at = (tier + 0.15 * rng.sample::<f64, _>(StandardNormal)).clamp(0.0, 1.0);
        let index = ((at * members.len() as f64) as usize).min(members.len() - 1);
        members[index]
    }
}

/// Shop-style price points: x.99 from 10 up, x.x9 below; never under 0.49.
fn charm_cents(price: f64) -> u32 {
    let cents = if price >= 10.0 {
        price.round() * 100.0 - 1.0
    } else {
        (price * 10.0).round() * 10.0 - 1.0
    };
    (cents.max(49.0).min(f64::from(u32::MAX / 1024))) as u32
}

/// Splits `total` into integer counts proportional to `weights`, each at least `floor`
/// (largest-remainder rounding, so the counts add up to `total` exactly).
fn apportion(weights: &[f64], total: usize, floor: usize) -> Vec<usize> {
    let spare = total.saturating_sub(floor * weights.len()) as f64;
    let sum: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| spare * w / sum).collect();
    let mut counts: Vec<usize> = exact.iter().map(|e| floor + *e as usize).collect();
    let mut left = total.saturating_sub(counts.iter().sum());
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        let ra = exact[a].fract();
        let rb = exact[b].fract();
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for i in order.into_iter().cycle() {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    counts
}

fn cumulative(weights: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut acc = 0.0;
    weights
        .map(|w| {
            acc += w;
            acc
        })
        .collect()
}

/// Index drawn from a cumulative weight table.
pub(crate) fn pick(cdf: &[f64], rng: &mut impl Rng) -> usize {
    let total = cdf.last().copied().unwrap_or(0.0);
    let u = rng.random::<f64>() * total;
    cdf.partition_point(|&c| c <= u)
        .min(cdf.len().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn catalogue_has_the_documented_shape() {
        let cat = Catalogue::generate(&mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(cat.categories.len(), CATEGORIES);
        assert_eq!(cat.products.len(), PRODUCTS);
        for c in &cat.categories {
            assert!(c.products.len() >= MIN_PRODUCTS_PER_CATEGORY);
            let prices: Vec<u32> = c
                .products
                .iter()
                .map(|&p| cat.products[p as usize].list_cents)
                .collect();
            assert!(prices.windows(2).all(|w| w[0] <= w[1]));
        }
        assert!(cat.products.iter().all(|p| p.list_cents >= 49));
    }

    #[test]
    fn apportion_is_exact() {
        let counts = apportion(&[1.0, 2.0, 3.3], 100, 5);
        assert_eq!(counts.iter().sum::<usize>(), 100);
        assert!(counts.iter().all(|&c| c >= 5));
    }
}
